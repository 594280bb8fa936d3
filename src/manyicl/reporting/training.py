"""The fine-tunes' training logs, for the report's training-curve table and figure: the loss at the start and the
end of each run (mean of the first and the last tenth of its steps), the tasks it learned, its running mean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from manyicl.files import read_log
from manyicl.methods import REFERENCE

MIXTURE = "mixture"  # the group of the mixture fine-tunes; the other group is the per-task reference


def training_logs(run_dir: Path) -> dict[str, list[dict]]:
    """Fine-tune (its folder under train/) -> its train_log.jsonl, in path order; the empty ones left out."""
    logs = {p.parent.relative_to(run_dir / "train").as_posix(): read_log(p)
            for p in sorted((run_dir / "train").glob("**/train_log.jsonl"))}
    return {name: log for name, log in logs.items() if log}


class FineTune(NamedTuple):
    summary: dict  # train_summary.json: steps, seconds, precision
    mixture: dict[str, dict]  # mixture.json: per task, its weight, quota, sequences and supervised answers


def fine_tunes(run_dir: Path, methods: list[str]) -> dict[str, FineTune]:
    """The finished mixture fine-tunes among ``methods`` (train/<method> with a summary and a mixture)."""
    found = {}
    for m in methods:
        mixture, summary = run_dir / "train" / m / "mixture.json", run_dir / "train" / m / "train_summary.json"
        if mixture.exists() and summary.exists():
            found[m] = FineTune(json.loads(summary.read_text()), json.loads(mixture.read_text()))
    return found


def training_groups(logs: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """The mixture fine-tunes, and the per-task ones (by task), each group only where it has a log."""
    groups = {MIXTURE: {n: g for n, g in logs.items() if not n.startswith(f"{REFERENCE}/")},
              REFERENCE: {n.split("/", 1)[1]: g for n, g in logs.items() if n.startswith(f"{REFERENCE}/")}}
    return {k: v for k, v in groups.items() if v}


class LossSummary(NamedTuple):
    steps: int  # the last step logged
    start: float  # mean loss over the first tenth of the steps
    end: float  # ... over the last tenth
    tasks_learned: str  # "k of n", "–" without a task trained alone on at least 2 steps


def tasks_learned(log: list[dict]) -> str:
    """"k of n": tasks whose single-task steps have a lower mean loss in their second half than in their first."""
    by_task: dict[str, list[float]] = {}
    for r in log:
        if len(r.get("tasks") or []) == 1:
            by_task.setdefault(r["tasks"][0], []).append(r["loss"])
    halves = [(np.mean(v[: len(v) // 2]), np.mean(v[len(v) // 2:])) for v in by_task.values() if len(v) >= 2]
    return f"{sum(b < a for a, b in halves)} of {len(halves)}" if halves else "–"


def loss_summary(log: list[dict]) -> LossSummary:
    losses = [r["loss"] for r in log]
    tenth = max(1, len(losses) // 10)
    return LossSummary(log[-1]["step"], float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])),
                       tasks_learned(log))


def running_mean(log: list[dict]) -> tuple[list[int], np.ndarray]:
    """(steps, loss) smoothed over a twentieth of the steps: one step's loss depends on its sequence."""
    steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
    window = max(1, len(losses) // 20)
    return steps[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid")
