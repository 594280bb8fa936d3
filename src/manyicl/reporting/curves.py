"""The report's in-context learning curves (curves.json, evaluation/curves.py): statistics, then the markdown
(the figure: plots.learning_curves).

For every task and method: the mean NLL per token of answer k given the k-1 answers before it, at every k up to
the last one every sequence reaches, with a percentile-bootstrap interval over sequences; the paired difference
ManyICL − each method on the same sequences (the same resampled sequences for both); and the average over the
held-out tasks at each task's last k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manyicl.evaluation.curves import CURVES_FILE, load_curves
from manyicl.methods import METHODS, SUBJECT
from manyicl.uncertainty import RESAMPLES, Estimate, interval_of

TABLE_KS = (1, 4, 16, 64)


@dataclass(frozen=True)
class Curve:
    """One (method, task): per-token NLL of answer k (column k-1) of each sequence (row), paired by seed."""

    method: str
    task: str
    role: str
    seeds: tuple[int, ...]
    digests: tuple[str, ...]
    per_token: np.ndarray  # (sequences, last_k)

    @property
    def last_k(self) -> int:
        return self.per_token.shape[1]


def load_curve_table(run_dir: Path) -> dict[tuple[str, str], Curve]:
    """The curves of a run's curves.json (see curve_table)."""
    return curve_table(load_curves(run_dir / CURVES_FILE))


def curve_table(records: list[dict]) -> dict[tuple[str, str], Curve]:
    """(method, task) -> Curve, cut at the last k that every sequence of every method of that task reaches."""
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_cell.setdefault((r["method"], r["task"]), []).append(r)
    last = {}
    for (_, task), rs in by_cell.items():
        last[task] = min([last.get(task, 10**9)] + [len(r["answer_nll"]) for r in rs])
    curves = {}
    for (method, task), rs in by_cell.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        k = last[task]
        per_token = np.asarray([np.asarray(r["answer_nll"][:k]) / np.asarray(r["answer_tokens"][:k]) for r in rs])
        curves[method, task] = Curve(method, task, rs[0]["role"], tuple(r["seed"] for r in rs),
                                     tuple(r["ids_sha256"] for r in rs), per_token)
    return curves


def _draws(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, size=(RESAMPLES, n))


def curve_band(curve: Curve, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean per-token NLL at every k, and its 95 % bootstrap band over sequences."""
    index = _draws(len(curve.per_token), np.random.default_rng(seed))
    draws = curve.per_token[index].mean(axis=1)  # (RESAMPLES, last_k)
    low, high = np.quantile(draws, [0.025, 0.975], axis=0)
    return curve.per_token.mean(axis=0), low, high


def at_k(curve: Curve, k: int, seed: int = 0) -> Estimate:
    values = curve.per_token[:, k - 1]
    draws = values[_draws(len(values), np.random.default_rng(seed))].mean(axis=1)
    return Estimate(float(values.mean()), *interval_of(draws))


def paired(a: Curve, b: Curve) -> bool:
    return a.seeds == b.seeds and a.digests == b.digests


def difference_at_k(a: Curve, b: Curve, k: int, seed: int = 0) -> Estimate | None:
    """a − b at answer k over the same sequences (None when they are not the same sequences)."""
    if not paired(a, b):
        return None
    diff = a.per_token[:, k - 1] - b.per_token[:, k - 1]
    draws = diff[_draws(len(diff), np.random.default_rng(seed))].mean(axis=1)
    return Estimate(float(diff.mean()), *interval_of(draws))


def average_difference_at_last_k(curves: dict, a: str, b: str, tasks: list[str], seed: int = 0) -> Estimate | None:
    """Mean over tasks of (a − b) at each task's last k, each task's sequences resampled alike for a and b."""
    pairs = [(curves.get((a, t)), curves.get((b, t))) for t in tasks]
    if not pairs or any(x is None or y is None or not paired(x, y) for x, y in pairs):
        return None
    rng = np.random.default_rng(seed)
    diffs = [x.per_token[:, -1] - y.per_token[:, -1] for x, y in pairs]
    draws = np.mean([d[_draws(len(d), rng)].mean(axis=1) for d in diffs], axis=0)
    return Estimate(float(np.mean([d.mean() for d in diffs])), *interval_of(draws))


# ---------------------------------------------------------------- rendering


def _fmt(e: Estimate | None, signed: bool = False) -> str:
    if e is None:
        return "—"
    value = f"{e.value:+.3f}" if signed else f"{e.value:.3f}"
    return f"{value} [{e.low:+.3f}, {e.high:+.3f}]" if signed else f"{value} [{e.low:.3f}, {e.high:.3f}]"


def curve_methods(curves: dict) -> list[str]:
    present = {m for m, _ in curves}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def curve_sections(curves: dict[tuple[str, str], Curve]) -> list[str]:
    """The markdown of the learning-curve section ([] when the run measured none)."""
    if not curves:
        return []
    methods = curve_methods(curves)
    lines = ["## In-context learning curves", "",
             "Mean NLL per answer token (nats) of answer k given the k − 1 answers before it, on many-shot "
             "sequences of each task's test split (the same sequences for every method); 95 % bootstrap intervals "
             "over sequences. Lower is better; a falling curve is learning in context. `last` is the last k every "
             f"sequence of the task reaches. Δ = {SUBJECT} − method on the same sequences (negative: {SUBJECT} "
             "predicts the answers better).", ""]
    for role, title in (("held_out", "Held-out tasks"), ("in_distribution", "Mixture tasks (in distribution)")):
        tasks = sorted({t for (_, t), c in curves.items() if c.role == role})
        if not tasks:
            continue
        lines += [f"### {title}", "", "| task | method | " + " | ".join(f"k={k}" for k in TABLE_KS) + " | last k | "
                  "Δ at last k |", "|---|---|" + "---:|" * (len(TABLE_KS) + 2)]
        for t in tasks:
            for m in methods:
                c = curves.get((m, t))
                if c is None:
                    continue
                cols = [_fmt(at_k(c, k)) if k < c.last_k else "" for k in TABLE_KS]
                subject = curves.get((SUBJECT, t))
                delta = difference_at_k(subject, c, c.last_k) if subject is not None and m != SUBJECT else None
                lines.append(f"| {t} | {m} | " + " | ".join(cols) + f" | {c.last_k}: {_fmt(at_k(c, c.last_k))} | "
                             f"{_fmt(delta, signed=True)} |")
        if role == "held_out" and (SUBJECT, tasks[0]) in curves:
            lines += ["", f"Average over the {len(tasks)} held-out tasks at each task's last k, {SUBJECT} − method "
                      "(paired by sequence):", ""]
            for m in methods:
                if m != SUBJECT:
                    lines.append(f"- {m}: {_fmt(average_difference_at_last_k(curves, SUBJECT, m, tasks), signed=True)}")
        lines.append("")
    return lines

