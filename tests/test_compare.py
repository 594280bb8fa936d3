"""compare end to end on a tiny model and synthetic tasks: every method, stage reuse, report, bad input."""

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from manyicl.cli import main
from manyicl.synthetic import GENERATORS, make_task


def config(tiny_model_dir, out, **extra):
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "tasks": {
            "meta_train": [{"name": n, "synthetic": True} for n in ("sym_sentiment", "addition", "reverse_words")],
            "held_out": [{"name": "sym_topic", "synthetic": True}, {"name": "key_lookup", "synthetic": True}],
            "forgetting": [{"name": "world_capitals", "synthetic": True}],
        },
        "training": {"max_tokens": 128, "max_steps": 2, "save_steps": 1, "lora": {"r": 2, "alpha": 4}},
        "evaluation": {"shots": [0, 2], "seeds": [0, 1], "max_queries": 3, "forgetting_shots": [1], "max_tokens": 256},
        "compare": {"task_level_steps": 1},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def run(path, *args):
    return CliRunner().invoke(main, ["compare", str(path), *args])


def test_synthetic_suite():
    families = {make_task(n).family for n in GENERATORS}
    assert len(GENERATORS) >= 12 and len(families) >= 5
    assert make_task("sym_topic", seed=0).train == make_task("sym_topic", seed=0).train
    assert make_task("sym_topic", seed=0).labels != make_task("sym_topic", seed=1).labels  # random across tasks
    for n in GENERATORS:
        t = make_task(n)
        if n != "made_up_capitals":
            assert not {e.input for e in t.train} & {e.input for e in t.test}


def test_compare_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    cfg = config(tiny_model_dir, out, evaluation__shots=[0, 2, "max@384"], evaluation__learning_curve=True,
                 evaluation__curve_sequences=2, compare__budgets=[0.5, 1.0],
                 compare__budget_shots=[2], training__lr_scheduler="constant_with_warmup")
    cfg["tasks"]["distance"] = {"sym_topic": "near", "key_lookup": "far"}
    cfg["tasks"]["in_distribution"] = [{"name": "sym_sentiment", "synthetic": True}]
    path.write_text(yaml.safe_dump(cfg))
    # stage 1 of a long run: the fine-tunes alone, no evaluation
    result = run(path, "--train-only")
    assert result.exit_code == 0, result.output
    assert not (out / "results.json").exists() and (out / "train" / "manyicl" / "adapter").exists()
    assert (out / "train" / "task_level" / "key_lookup" / "train_summary.json").exists()
    trained = {p: p.stat().st_mtime for p in (out / "train").rglob("adapter_model.safetensors")}
    result = run(path)
    assert result.exit_code == 0, result.output
    assert all(p.stat().st_mtime == t for p, t in trained.items())  # stage 2 reuses every fine-tune
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results}
    assert methods == {"base", "zero_shot_ft", "few_shot_ft", "many_shot_last_ft", "manyicl", "task_level"}
    assert {r["task"] for r in results if r["method"] == "task_level"} == {"sym_topic", "key_lookup"}
    assert (out / "report.md").exists() and (out / "plots" / "shot_scaling.png").exists()
    report = (out / "report.md").read_text()
    assert "Gap closed" in report and "Forgetting" in report and "supervised answers seen" in report
    assert "| mixture tasks drawn |" in report
    assert "ManyICL against each method" in report and "95 % interval" in report
    for section in ("## Method ordering", "## Past the training length", "## Training curves"):
        assert section in report
    assert "near average" in report and "far average" in report and "sym_topic (near)" in report
    longer = [r for r in results if r["shots_requested"] == "max@384"]
    assert longer and {r["max_tokens"] for r in longer} == {384}
    assert all(r["shots"] > 2 for r in longer if r["task"] == "sym_topic")  # more demonstrations fit in 384 tokens
    assert {r["seed"] for r in results if r["shots_requested"] == 0} == {0}  # nothing to draw at 0 shots: one cell
    assert (out / "plots" / "training_curves.png").exists()
    # the learning curves: every method on the held-out and in-distribution tasks, the same sequences for all
    curves = json.loads((out / "curves.json").read_text())
    assert {(r["method"], r["task"]) for r in curves if r["method"] != "task_level"} == {
        (m, t) for m in methods - {"task_level"} for t in ("sym_topic", "key_lookup", "sym_sentiment")}
    assert {(r["task"], r["seed"]) for r in curves if r["method"] == "task_level"} == {
        (t, s) for t in ("sym_topic", "key_lookup") for s in (0, 1)}
    assert len({r["ids_sha256"] for r in curves if r["task"] == "sym_topic" and r["seed"] == 0}) == 1
    assert "## In-context learning curves" in report and (out / "plots" / "learning_curves.png").exists()
    assert "Average over the 2 held-out tasks at each task's last k, manyicl − method" in report
    assert "## In distribution (the mixture's own tasks" in report
    assert {r["shots_requested"] for r in results if r["role"] == "in_distribution"} == {"max"}
    # every fine-tune's adapter has a model card, with this run's evaluation once compare made one
    card = (out / "train" / "manyicl" / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "many_shot_all" in card
    assert "| sym_sentiment |" in card and "tokens:" in card and "## Evaluation" in card and "**average**" in card
    # the budget point: every mixture fine-tune from its step-1 checkpoint, held-out tasks at max, and its curves
    early = json.loads((out / "budgets" / "step-1" / "results.json").read_text())
    mixture_methods = {"zero_shot_ft", "few_shot_ft", "many_shot_last_ft", "manyicl"}
    assert {(r["method"], r["task"], r["shots_requested"], r["seed"]) for r in early} == {
        (m, t, 2, s) for m in mixture_methods for t in ("sym_topic", "key_lookup") for s in (0, 1)}
    assert all(r["adapter"].endswith("checkpoint-1") for r in early)
    early_curves = json.loads((out / "budgets" / "step-1" / "curves.json").read_text())
    assert {(r["method"], r["task"]) for r in early_curves} == {
        (m, t) for m in mixture_methods for t in ("sym_topic", "key_lookup", "sym_sentiment")}
    assert {r["ids_sha256"] for r in early_curves if r["task"] == "sym_topic" and r["seed"] == 0} == {
        r["ids_sha256"] for r in curves if r["task"] == "sym_topic" and r["seed"] == 0}  # the same sequences
    budget = report.split("## Training budget")[1].split("\n## ")[0]
    assert "| step 1 | step 2 |" in budget and "manyicl − method at each budget" in budget
    assert "constant after warm-up (constant_with_warmup)" in budget
    averages = next(line for line in budget.splitlines() if line.startswith("| manyicl |"))
    assert averages.count("[") == 2  # an interval at both budget points
    assert "In-context learning curves at each budget" in budget and (out / "plots" / "budget_curve.png").exists()
    assert "| method | step 2 − step 1 |" in budget  # does manyicl's difference grow with the budget?
    assert all(f"| {m} | " in budget.split("step 2 − step 1 |")[1]
               for m in ("base", "zero_shot_ft", "few_shot_ft", "many_shot_last_ft"))
    # forgetting: drop = base − method, from the same seeds' means
    forgetting = report.split("## Forgetting")[1].split("##")[0]
    mean = lambda m: sum(r["value"] for r in results if r["method"] == m and r["role"] == "forgetting") / 2  # noqa: E731
    row = next(line for line in forgetting.splitlines() if line.startswith("| world_capitals | manyicl |"))
    assert float(row.split("|")[5].strip(" *").split()[0]) == pytest.approx(mean("base") - mean("manyicl"), abs=1e-3)
    findings = report.split("## What this run found")[1].split("##")[0]  # the report opens with what it found
    assert report.index("## What this run found") < report.index("## Held-out") and "ManyICL scores" in findings
    table = report.split("## Held-out tasks")[1].split("##")[0]
    assert all("[" in line for line in table.splitlines() if line.startswith("| sym_topic"))  # intervals on every cell
    # every fine-tune had the same budget: same steps and sequences
    budgets = {m: json.loads((out / "train" / m / "train_summary.json").read_text())["steps"]
               for m in ("zero_shot_ft", "few_shot_ft", "many_shot_last_ft", "manyicl")}
    assert set(budgets.values()) == {2}
    # a rerun reuses every stage; adding a held-out task does only the missing work
    n = len(results)
    mtimes = {p: p.stat().st_mtime for p in (out / "train").rglob("adapter_model.safetensors")}
    cfg["tasks"]["held_out"].append({"name": "box_membership_nli", "synthetic": True})
    cfg["tasks"]["distance"]["box_membership_nli"] = "far"
    path.write_text(yaml.safe_dump(cfg))
    assert run(path).exit_code == 0
    again = json.loads((out / "results.json").read_text())
    assert again[:n] == results and {r["task"] for r in again[n:]} == {"box_membership_nli"}
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())
    # --only runs a subset; report regenerates from results
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tasks__held_out": [{"name": "addition", "synthetic": True}]},
         "'addition' is in both meta_train and held_out"),
        ({"compare__methods": ["base", "magic"]}, "unknown method 'magic'"),
        ({"tasks__distance": {"sym_topic": "near", "addition": "far"}},
         "tasks.distance: 'addition' is not a held-out task"),
        ({"tasks__distance": {"sym_topic": "near"}}, "held-out task 'key_lookup' has no label; say near or far"),
        ({"tasks__distance": {"sym_topic": "close", "key_lookup": "far"}}, "tasks.distance.sym_topic"),
        ({"evaluation__shots": [0, "max@lots"]}, "evaluation.shots.1"),
        ({"evaluation__shots": [0, "max@9000"]}, "a context of 9000 tokens exceeds the model's context length"),
        ({"compare__budgets": [0.5, 1.0], "training__save_steps": 2}, "compare.budgets: 0.5 of 2 steps is step 1, "
                                                                       "where no checkpoint is saved"),
        ({"compare__budgets": [1.5]}, "compare.budgets.0"),
    ],
)
def test_compare_bad_input(tiny_model_dir, tmp_path, extra, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, tmp_path / "run", **extra)))
    result = run(path)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_compare_refuses_a_different_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, evaluation__max_queries=2)))
    assert run(path, "--only", "base", "--train-only").exit_code == 0  # writes the config, evaluates nothing
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out)))
    assert run(path, "--only", "base").exit_code == 0  # nothing evaluated yet: an evaluation setting may still change
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, evaluation__max_queries=2)))
    result = run(path, "--only", "base")
    assert result.exit_code == 2 and "evaluation.max_queries differ" in result.stderr  # now records would mix
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, training__release_freed_memory=False)))
    assert run(path, "--only", "base").exit_code == 0  # a memory/speed setting: same results, accepted
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, training__learning_rate=0.1)))
    result = run(path, "--only", "base")
    assert (result.exit_code == 2 and "different config (training differ)" in result.stderr
            and "--overwrite" in result.stderr)
    assert run(path, "--only", "base", "--overwrite").exit_code == 0


def test_compare_keeps_one_precision_across_methods(tiny_model_dir, tmp_path, monkeypatch):
    """auto may resolve differently when a run goes on elsewhere (or be measured differently): the methods still
    to train get the finished ones' precision, and an explicit other precision is refused before any work."""
    from manyicl.training import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out)))
    assert run(path, "--only", "zero_shot_ft", "--train-only").exit_code == 0  # auto -> fp32 here
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # auto would now be measured
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, training__precision="bf16")))
    result = run(path, "--only", "manyicl", "--train-only")
    assert result.exit_code == 2
    assert f"{out / 'train' / 'zero_shot_ft'}: trained in fp32, but this run asks for training.precision bf16; " \
           f"set training.precision: fp32 (or auto)" in result.stderr
    assert not (out / "train" / "manyicl").exists()
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out)))
    result = run(path, "--only", "manyicl", "--train-only")
    assert result.exit_code == 0, result.output
    assert "training.precision auto: fp32, as the finished fine-tunes" in result.output
    assert json.loads((out / "train" / "manyicl" / "train_summary.json").read_text())["precision"] == "fp32"


def test_compare_goes_on_with_a_bf16_run_on_a_cpu_without_bf16(tiny_model_dir, tmp_path, monkeypatch):
    """A run trained in bf16 goes on on a CPU without AVX-512 BF16: its evaluations (which never use
    training.precision), and a fine-tune still to train, in bf16 emulated (test_bf16_emulation.py)."""
    from manyicl.training import precision

    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, out, training__precision="bf16")))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # autocast runs on any CPU, only slower
    assert run(path, "--only", "zero_shot_ft", "--train-only").exit_code == 0
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    result = run(path, "--only", "zero_shot_ft")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())
    result = run(path, "--only", "manyicl", "--train-only")
    assert result.exit_code == 0 and "emulated on fp32 kernels" in result.output
    summary = json.loads((out / "train" / "manyicl" / "train_summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["bf16_steps"]["native"] == 0
    # fine-tunes of two precisions are refused even where nothing is left to train (a record edited to say so)
    shutil.copytree(out / "train" / "zero_shot_ft", out / "train" / "many_shot_last_ft")
    summary = out / "train" / "many_shot_last_ft" / "train_summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "precision": "fp32"}))
    result = run(path, "--only", "zero_shot_ft")
    assert result.exit_code == 2 and "fine-tunes were trained in bf16 and fp32" in result.stderr

