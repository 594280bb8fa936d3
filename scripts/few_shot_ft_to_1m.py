"""A side check for docs/RESULTS.md (issue 21): few_shot_ft trained past 1,000,000 tokens.

The real run gave every method 500 steps of at most 2,048 tokens; few_shot_ft's packed 6-example units filled
948,661 tokens of them, under the issue's 1,000,000. This continues few_shot_ft's step-500 checkpoint (optimizer and
scheduler state included, committed under docs/results/real_smollm2_1m/train/few_shot_ft/checkpoints/) to step 530
(past 1M tokens), evaluates it on the held-out tasks at max shots with the run's queries and demonstrations, and
reads manyicl − few_shot_ft with `manyicl report` on a copy of the run's records whose few_shot_ft max-shot cells
are the new ones.

Not the run: it runs at whatever commit you are on, and the mixture's quotas are drawn for 530 steps, so steps
501-530 take that schedule's sequences. The resume guard, which refuses a checkpoint made with another config
(rightly: the schedule depends on max_steps), is passed by re-stamping the copied checkpoint's marker, on purpose
and only in the scratch folder.

    python scripts/few_shot_ft_to_1m.py [WORK_DIR]   # about 25 min on 2 cores; default /tmp/few_shot_ft_1m
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from manyicl.config import load_config
from manyicl.evaluation.records import read_cell_records, write_cell_records
from manyicl.files import logged_tokens
from manyicl.training.checkpoints import CHECKPOINT_MARKER, config_hash

STEPS = 530  # 948,661 tokens in 500 steps is about 1,897 a step: 27 more steps reach 1M, 30 leave a margin
REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "docs/results/real_smollm2_1m"
METHOD = "few_shot_ft"


def manyicl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "manyicl.cli", *args], cwd=REPO, check=True)


def continue_training(work: Path) -> Path:
    """The step-500 checkpoint, continued to STEPS in work/train/few_shot_ft; returns the config written."""
    out = work / "train" / METHOD
    (out / "checkpoints").mkdir(parents=True)
    source = RECORDS / "train" / METHOD
    shutil.copytree(source / "checkpoints/checkpoint-500", out / "checkpoints/checkpoint-500")
    for name in ("train_log.jsonl", "mixture.json"):
        shutil.copy(source / name, out / name)
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["training"]["max_steps"] = STEPS
    config["output_dir"] = str(out)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    marker = out / "checkpoints/checkpoint-500" / CHECKPOINT_MARKER
    stamp = json.loads(marker.read_text())
    stamp["config"] = config_hash(load_config(path))
    marker.write_text(json.dumps(stamp))
    manyicl("train", str(path), "--resume")
    print(f"{METHOD}: {STEPS} steps, {logged_tokens(out / 'train_log.jsonl'):,} tokens")
    return path


def evaluate(work: Path, config: Path) -> Path:
    """Held-out tasks at max shots only, into work/eval."""
    out = work / "eval"
    manyicl("eval", str(config), "--adapter", str(work / "train" / METHOD / "adapter"), "--method", METHOD,
            "--set", "evaluation.shots=[max]", "--set", "evaluation.learning_curve=false",
            "--set", "tasks.forgetting=[]", "--set", "tasks.in_distribution=[]", "--set", f"output_dir={out}")
    return out


def swap_cells(work: Path, evaluated: Path) -> Path:
    """A copy of the run's records with few_shot_ft's held-out max-shot cells replaced by the new ones. The cells
    must have the same prompts (shot count and demonstration tokens) for the pairing with manyicl to hold."""
    records = work / "records" / RECORDS.name
    shutil.copytree(RECORDS, records)
    new = {(r.task, r.seed): r for r in read_cell_records(evaluated / "results.json")}
    rows = read_cell_records(records / "results.json")
    swapped = 0
    for i, row in enumerate(rows):
        if row.method == METHOD and row.role == "held_out" and row.shots_requested == "max":
            replacement = new[(row.task, row.seed)]
            if (replacement.shots, replacement.prefix_tokens) != (row.shots, row.prefix_tokens):
                raise SystemExit(f"{row.task} seed {row.seed}: the new cell's prompt differs from the run's")
            shutil.copy(evaluated / replacement.predictions, records / row.predictions)
            rows[i] = replacement
            swapped += 1
    write_cell_records(records / "results.json", rows)
    print(f"swapped {swapped} cells")
    return records


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/few_shot_ft_1m")
    if work.exists():
        shutil.rmtree(work)
    config = continue_training(work)
    records = swap_cells(work, evaluate(work, config))
    manyicl("report", str(records))
    # what the check is for: every method's average and every pair, few_shot_ft at 1M tokens among them
    report = (records / "report.md").read_text().split("\n## ")
    for section in report:
        if section.startswith("Method ordering (average"):
            print("## " + section)


if __name__ == "__main__":
    main()
