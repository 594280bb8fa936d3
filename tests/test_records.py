"""The cell record of results.json: the committed records (written before the schema had a version) still read and
write back unchanged but for the version; the oldest records read with defaults; a newer version, a record that is
not one, and unknown keys; a rerun over version-1 records reuses them; the report of a version-1 file is the report
of the same records upgraded."""

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import tiny_config
from manyicl.errors import ManyICLError
from manyicl.evaluation.records import (
    FIELDS,
    SCHEMA_VERSION,
    CellRecord,
    cell_key,
    read_cell_records,
    write_cell_records,
)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
COMMITTED = sorted(RESULTS.glob("*results.json")) + sorted(RESULTS.glob("**/results.json"))
# the keys of the first records (evaluate.py, before intervals, answer forms and prediction files were recorded)
OLDEST = ("model", "adapter", "method", "role", "task", "family", "metric", "shots", "shots_requested", "seed",
          "value", "metrics", "n", "skipped", "prefix_tokens", "max_tokens", "prefix_cache", "seconds")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_committed_records_read_and_write_back_as_they_were_plus_the_version(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    records = read_cell_records(path)
    assert len(records) == len(data) > 0
    for r, raw in zip(records, data):
        assert r.to_json() == {"schema_version": SCHEMA_VERSION, **raw}
        # the same key order (records written since the version was recorded carry it already)
        assert list(r.to_json()) == ["schema_version", *(k for k in raw if k != "schema_version")]
        assert CellRecord.from_json(r.to_json(), "here") == r
        assert r.key == cell_key(raw["method"], raw["model"], raw["adapter"], raw["task"], raw["shots_requested"],
                                 raw["seed"])


def test_the_oldest_records_read_with_defaults():
    raw = {k: v for k, v in json.loads((RESULTS / "forgetting_screen_results.json").read_text())[0].items()
           if k in OLDEST and k != "role"}
    r = CellRecord.from_json(raw, "here")
    assert r.role == "held_out" and math.isnan(r.ci_low) and r.predictions is None and not r.is_collapsed
    written = r.to_json()
    assert written["schema_version"] == SCHEMA_VERSION and written["role"] == "held_out"
    assert "predictions" not in written and "scoring" not in written  # not measured: absent, not null
    assert CellRecord.from_json(written, "here") == r


def test_unknown_keys_are_kept_and_a_newer_version_or_a_non_record_is_refused(tmp_path):
    raw = {**json.loads((RESULTS / "forgetting_screen_results.json").read_text())[0], "tokens_per_second": 12.5}
    r = CellRecord.from_json(raw, "here")
    assert r.extra == {"tokens_per_second": 12.5} and r.to_json()["tokens_per_second"] == 12.5
    path = tmp_path / "results.json"
    path.write_text(json.dumps([raw, {**raw, "schema_version": SCHEMA_VERSION + 1}]))
    with pytest.raises(ManyICLError, match=rf"results.json: record 2: schema_version {SCHEMA_VERSION + 1} is newer "
                                           r".*update manyicl"):
        read_cell_records(path)
    path.write_text(json.dumps([{k: v for k, v in raw.items() if k != "task"}]))
    with pytest.raises(ManyICLError, match=r"results.json: record 1: a cell record without task; .* move the file"):
        read_cell_records(path)
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(ManyICLError, match=r"results.json: not a list of cell records"):
        read_cell_records(path)


def test_every_field_round_trips(tmp_path):
    r = CellRecord(model="m", method="manyicl", task="t", family="classification", metric="accuracy", shots=4,
                   shots_requested="max", seed=1, value=0.5, ci_low=0.25, ci_high=0.75, n=8, scoring="sum",
                   demo_labels={"a": 2, "b": 2}, prediction_counts={"a": 8}, gold_counts={"a": 4, "b": 4},
                   collapsed=True, predictions="predictions/x.jsonl", same_prompts_as=32)
    assert [k for k in r.to_json() if k != "schema_version"] == [f for f in FIELDS if f not in (
        "metric_setup", "prefix_cache", "backend")]  # None: absent, but adapter and max_tokens (null)
    write_cell_records(tmp_path / "results.json", [r, r])
    assert read_cell_records(tmp_path / "results.json") == [r, r]


def test_a_rerun_over_version_1_records_reuses_them_and_writes_the_current_version(tiny_model_dir, data_dir,
                                                                                    tmp_path):
    from manyicl.catalog import load_tasks
    from manyicl.config import ExperimentConfig
    from manyicl.evaluation import run_evaluation

    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "out")
    cfg["tasks"].update(held_out=["sst2"])
    cfg["evaluation"] = {"shots": [0, 2], "seeds": [0, 1], "max_queries": 3, "max_tokens": 512}
    config = ExperimentConfig.model_validate(cfg)
    tasks = [(t, "held_out") for t in load_tasks(config.tasks, config.tasks.held_out)]
    results = run_evaluation(config, tasks)
    assert {r["schema_version"] for r in results} == {SCHEMA_VERSION}
    old = [{k: v for k, v in r.items() if k in OLDEST} for r in results[:-1]]  # version 1, its last cell missing
    (tmp_path / "out" / "results.json").write_text(json.dumps(old))
    again = run_evaluation(config, tasks)
    assert again[:-1] == [CellRecord.from_json(r, "here").to_json() for r in old]  # reused, upgraded
    assert {k: v for k, v in again[-1].items() if k != "seconds"} == {
        k: v for k, v in results[-1].items() if k != "seconds"}  # only the missing cell was evaluated again


def test_the_report_of_version_1_records_is_the_report_of_them_upgraded(tmp_path):
    from manyicl.reporting import write_report

    reports = []
    for name, upgrade in (("v1", False), ("v2", True)):
        run = tmp_path / name
        shutil.copytree(RESULTS / "real_smollm2_train", run / "train")
        records = json.loads((RESULTS / "real_smollm2_results.json").read_text(encoding="utf-8"))
        if upgrade:
            records = [CellRecord.from_json(r, "here").to_json() for r in records]
        (run / "results.json").write_text(json.dumps(records))
        reports.append(write_report(run).read_text(encoding="utf-8").replace(f"comparison: {name}", ""))
    assert reports[0] == reports[1] and "## Held-out tasks at max shots" in reports[0]
