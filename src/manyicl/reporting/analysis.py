"""The report's statistics, apart from its rendering: the cells of a run's records, averages over tasks with 95 %
intervals, paired tests on the same queries and seeds (Benjamini-Hochberg over each table), and the gap to the
dedicated fine-tune that ManyICL closes. Every result is a named record, looked up by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from manyicl.evaluation.records import CellRecord
from manyicl.methods import METHODS, REFERENCE, SUBJECT, UNTUNED
from manyicl.metrics import METRICS, score
from manyicl.uncertainty import (
    Comparison,
    Estimate,
    average_interval,
    interval_of,
    paired_contrast,
    replicates,
    significant,
)


class CellId(NamedTuple):
    method: str
    task: str
    shots: str  # shots_requested, as text


@dataclass
class Cell:
    """One (method, task, shots) over its seeds: the records and their per-query metric rows, by seed."""

    records: list[CellRecord]
    rows: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def first(self) -> CellRecord:
        return self.records[0]

    @property
    def from_means(self):
        return METRICS[self.first.metric].from_means

    @property
    def shots(self) -> int:
        return round(float(np.mean([r.shots for r in self.records])))

    @property
    def collapsed(self) -> bool:
        return any(r.is_collapsed for r in self.records)

    def estimate(self) -> Estimate:
        if self.rows:
            return average_interval([list(self.rows.values())], [self.from_means])
        values = [r.value for r in self.records]  # records without per-query rows: no interval
        return Estimate(float(np.mean(values)), float("nan"), float("nan"))


Cells = dict[CellId, Cell]


def load_cells(run_dir: Path, records: Sequence[CellRecord]) -> Cells:
    """The one place records become cells, with each record's per-query rows read from its predictions file."""
    cells: Cells = {}
    for r in records:
        cell = cells.setdefault(CellId(r.method, r.task, str(r.shots_requested)), Cell([]))
        cell.records.append(r)
        path = run_dir / r.predictions if r.predictions else None
        if path is not None and path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            cell.rows[r.seed] = np.asarray([json.loads(line)["metric_row"] for line in lines], dtype=float)
    return cells


def shots_key(k: Any) -> tuple[int, int]:
    """Counts in order, then "max", then "max@N" by N (contexts longer than the evaluation budget)."""
    k = str(k)
    if k.startswith("max@"):
        return (2, int(k[4:]))
    return (1, 0) if k == "max" else (0, int(k))


def methods_of(records: Sequence[CellRecord]) -> list[str]:
    """The methods of the records, in the comparison's order (methods.METHODS), unknown names after them."""
    present = {r.method for r in records}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def tasks_of(records: Sequence[CellRecord], role: str) -> list[str]:
    return sorted({r.task for r in records if r.role == role})


def requested_shots(records: Sequence[CellRecord], role: str = "held_out") -> list[str]:
    return sorted({str(r.shots_requested) for r in records if r.role == role}, key=shots_key)


def headline_shots(records: Sequence[CellRecord], role: str = "held_out") -> str:
    """The largest shot count requested within the evaluation budget (``max`` if it was): where many-shot methods
    are compared. ``max@N`` cells (longer contexts) have their own section."""
    requested = requested_shots(records, role)
    return max([k for k in requested if "@" not in k] or requested, key=shots_key)


def cell_at(cells: Cells, method: str, task: str, shots: str) -> Cell | None:
    # task_level is a zero-shot model: its reference value is at 0 shots when it was evaluated there
    if method == REFERENCE and (method, task, "0") in cells:
        return cells[CellId(method, task, "0")]
    return cells.get(CellId(method, task, shots))


def average(cells: Cells, method: str, tasks: Sequence[str], shots: str) -> Estimate | None:
    """The mean over tasks of the seed-mean, resampling seeds and queries; None unless every task has rows."""
    members = [cell_at(cells, method, t, shots) for t in tasks]
    if any(c is None or not c.rows for c in members):
        return None
    return average_interval([list(c.rows.values()) for c in members], [c.from_means for c in members])


def paired_over(cells: Cells, a: str, b: str, tasks: Sequence[str], shots: str,
                b_shots: str | None = None) -> Comparison | None:
    """a − b (b at ``b_shots`` if given) on the average over tasks, paired bootstrap on the same queries and seeds;
    None unless every task has both cells."""
    return contrast_over([(cells, a, shots), (cells, b, b_shots or shots)], (1.0, -1.0), tasks)


def contrast_over(terms: Sequence[tuple[Cells, str, str]], weights: Sequence[float],
                  tasks: Sequence[str]) -> Comparison | None:
    """sum_i weights[i] * (the cell of method m_i at shots k_i in cells c_i, for terms[i] = (c_i, m_i, k_i)) on the
    average over tasks, paired on the queries and seeds all of them share (a − b is ((cells, a, k), (cells, b, k))
    with (1, −1); how much a − b changed between two budget points takes four terms); None unless every task has
    every cell. Each shared seed is its own unit, weighted so that a task's seeds average as in the tables (pooling
    the seeds' queries would take macro-F1 over both at once, another number than the mean of the two)."""
    units, fns, unit_weights = [], [], []
    for t in tasks:
        found = [cell_at(cells, method, t, shots) for cells, method, shots in terms]
        if any(c is None or not c.rows for c in found):
            return None
        seeds = sorted(set.intersection(*(set(c.rows) for c in found)))
        if not seeds or any(len(c.rows[s]) != len(found[0].rows[s]) for c in found for s in seeds):
            return None
        for s in seeds:
            units.append([c.rows[s] for c in found])
            fns.append(found[0].from_means)
            unit_weights.append(1 / (len(tasks) * len(seeds)))
    return paired_contrast(units, weights, fns, unit_weights=unit_weights)


def significance(comparisons: Sequence[Comparison | None]) -> list[bool]:
    """Benjamini-Hochberg over the comparisons of one table that exist; False where there is none."""
    marks = iter(significant([c.p_value for c in comparisons if c is not None]))
    return [c is not None and next(marks) for c in comparisons]


class TaskGroup(NamedTuple):
    name: str  # "average", "near average", "far average"
    tasks: list[str]


def averaged_groups(tasks: list[str], distance: dict[str, str]) -> list[TaskGroup]:
    """The averages every table reports: all held-out tasks, then near and far where the config labels them."""
    groups = [TaskGroup("average", tasks)]
    for kind in ("near", "far"):
        members = [t for t in tasks if distance.get(t) == kind]
        if members and len(members) < len(tasks):
            groups.append(TaskGroup(f"{kind} average", members))
    return groups


class PairedTest(NamedTuple):
    comparison: Comparison
    significant: bool  # after Benjamini-Hochberg over the table it belongs to


@dataclass(frozen=True)
class SubjectComparisons:
    """manyicl − every other method, paired on the same queries and seeds, per task and per group of tasks."""

    per_task: dict[tuple[str, str], PairedTest]  # (method, task)
    per_group: dict[tuple[str, str], PairedTest]  # (method, group name)

    def __bool__(self) -> bool:
        return bool(self.per_task or self.per_group)


def subject_comparisons(cells: Cells, methods: Sequence[str], tasks: list[str], shots: str,
                        groups: Sequence[TaskGroup]) -> SubjectComparisons:
    """Benjamini-Hochberg over all of them at once (one table); the averages only over more than one task."""
    if SUBJECT not in methods:
        return SubjectComparisons({}, {})
    table: list[tuple[bool, str, str, Comparison]] = []  # (a group, method, task or group, comparison)
    for m in (m for m in methods if m != SUBJECT):
        for t in tasks:
            c = paired_over(cells, SUBJECT, m, [t], shots)
            if c is not None:
                table.append((False, m, t, c))
        for name, members in groups:
            c = paired_over(cells, SUBJECT, m, members, shots) if len(tasks) > 1 else None
            if c is not None:
                table.append((True, m, name, c))
    marks = significant([c.p_value for *_, c in table])
    found = SubjectComparisons({}, {})
    for (group, m, scope, c), mark in zip(table, marks):
        (found.per_group if group else found.per_task)[m, scope] = PairedTest(c, mark)
    return found


class GapClosed(NamedTuple):
    """(manyicl − base) / (task_level − base) on one task or on a group's average score."""

    estimates: tuple[Estimate, Estimate, Estimate]  # base, manyicl, task_level
    ratio: float | None  # None where task_level ≤ base
    interval: tuple[float, float] | None  # of the bootstrap replicates; None without per-query rows
    tasks_averaged: int | None  # a group: how many tasks its average has; None: one task


@dataclass(frozen=True)
class GapTable:
    per_task: dict[str, GapClosed]
    per_group: dict[str, GapClosed]

    def headline(self) -> GapClosed | None:
        """The gap on the average over the held-out tasks, or on the one task there is."""
        if "average" in self.per_group:
            return self.per_group["average"]
        rows = [*self.per_task.values(), *self.per_group.values()]
        return rows[0] if len(rows) == 1 else None


def _gap_draws(cells: Cells, task: str, shots: str, rng: np.random.Generator
               ) -> tuple[list[Estimate], np.ndarray | None] | None:
    """base, manyicl and task_level on one task: their estimates and (RESAMPLES, 3) bootstrap replicates drawing
    the same queries for the three (base and manyicl paired seed by seed, task_level's one 0-shot cell repeated
    for each seed); None without the three cells, no replicates without per-query rows."""
    b, m, tl = (cell_at(cells, x, task, shots) for x in (UNTUNED, SUBJECT, REFERENCE))
    if not (b and m and tl):
        return None
    estimates = [c.estimate() for c in (b, m, tl)]
    seeds = sorted(set(b.rows) & set(m.rows))
    if not seeds or not tl.rows:
        return estimates, None
    reference = np.concatenate([next(iter(tl.rows.values()))] * len(seeds))
    joint = [np.concatenate([b.rows[s] for s in seeds]), np.concatenate([m.rows[s] for s in seeds]), reference]
    if len({len(x) for x in joint}) != 1:
        return estimates, None
    return estimates, replicates(joint, b.from_means, rng)


def _gap(estimates: Sequence[Estimate], values: np.ndarray, draws: np.ndarray | None,
         tasks_averaged: int | None) -> GapClosed:
    """The gap of values (base, manyicl, task_level) with the interval of its replicates (same columns)."""
    denominator = values[2] - values[0]
    if denominator <= 0:
        return GapClosed(tuple(estimates), None, None, tasks_averaged)
    interval = None
    if draws is not None:
        with np.errstate(divide="ignore", invalid="ignore"):  # a draw where task_level ties base has no gap to close
            ratios = (draws[:, 1] - draws[:, 0]) / (draws[:, 2] - draws[:, 0])
        interval = interval_of(ratios[np.isfinite(ratios)])
    return GapClosed(tuple(estimates), float((values[1] - values[0]) / denominator), interval, tasks_averaged)


def gap_closed(cells: Cells, tasks: list[str], shots: str, groups: Sequence[TaskGroup] = ()) -> GapTable:
    """Per task, then per group of tasks: the gap on the group's average score, every task's queries resampled alike
    for the three models (a group needs two tasks with all three cells)."""
    rng = np.random.default_rng(0)
    per_task = {t: found for t in tasks if (found := _gap_draws(cells, t, shots, rng)) is not None}
    table = GapTable({t: _gap(estimates, np.array([e.value for e in estimates]), draws, None)
                      for t, (estimates, draws) in per_task.items()}, {})
    for name, members in groups:
        members = [t for t in members if t in per_task]
        draws = [per_task[t][1] for t in members]
        if len(members) < 2 or any(d is None for d in draws):
            continue
        values = np.mean([[e.value for e in per_task[t][0]] for t in members], axis=0)
        mean_draws = np.mean(draws, axis=0)
        estimates = [Estimate(values[i], *interval_of(mean_draws[:, i])) for i in range(3)]
        table.per_group[name] = _gap(estimates, values, mean_draws, len(members))
    return table


@dataclass(frozen=True)
class Ordering:
    """Methods by their held-out average, and every pair's paired difference (higher-ranked − lower-ranked)."""

    ranked: list[str]
    averages: dict[str, Estimate | None]
    pairs: dict[tuple[str, str], PairedTest]  # Benjamini-Hochberg over the pairs


def majority_score(cell: Cell) -> float | None:
    """The metric of always giving the most frequent gold answer, on the cell's queries: the floor of a label or
    multiple-choice task (a collapsed cell sits near it); None where answers are generated. Macro-F1 is taken over
    the gold labels (a declared label no query has would only lower it)."""
    golds = cell.first.gold_counts
    if not golds:
        return None
    expanded = [[gold] for gold, count in golds.items() for _ in range(count)]
    majority = max(golds, key=golds.__getitem__)
    return score(cell.first.metric, [majority] * len(expanded), expanded, sorted(golds))["value"]


def collapsed_tasks(cells: Cells, methods: Sequence[str], tasks: Sequence[str], shots: str) -> list[str]:
    """The tasks where some method's cell at ``shots`` (task_level: 0) is collapsed (⚠): one label took nearly all of
    its predictions in some seed, so the cell measures the demonstrations' label mix more than the model."""
    return [t for t in tasks if any((c := cell_at(cells, m, t, shots)) is not None and c.collapsed for m in methods)]


def method_ordering(cells: Cells, methods: Sequence[str], tasks: list[str], shots: str) -> Ordering | None:
    """None with fewer than two tasks, two ranked methods or one paired difference."""
    if len(tasks) < 2:
        return None
    averages = {m: average(cells, m, tasks, shots) for m in methods}
    ranked = sorted((m for m in methods if averages[m]), key=lambda m: -averages[m].value)
    pairs = [(a, b, paired_over(cells, a, b, tasks, shots)) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    pairs = [(a, b, c) for a, b, c in pairs if c is not None]
    if len(ranked) < 2 or not pairs:
        return None
    marks = significant([c.p_value for *_, c in pairs])
    return Ordering(ranked, averages, {(a, b): PairedTest(c, mark) for (a, b, c), mark in zip(pairs, marks)})
