"""95 % intervals and paired tests for every number the project reports.

A metric is a function of per-query additive rows (metrics.py), so resampling queries = resampling rows, for
accuracy and macro-F1 alike. Per cell: scipy's percentile bootstrap over queries. Paired comparisons: the same
resampled queries for both methods, a two-sided p-value from the bootstrap distribution of the difference, and
Benjamini-Hochberg across the comparisons of a table (scipy). Averages over seeds and tasks resample both
levels: demonstration seeds within a task, queries within a cell. scipy's bootstrap takes one sample set at a
time, so the paired and two-level resampling is numpy (shared query indices per replicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

FromMeans = Callable[[np.ndarray], np.ndarray]
RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def _statistic(rows: np.ndarray, from_means: FromMeans):
    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        return from_means(rows[index].mean(axis=-2))

    return statistic


def cell_interval(rows: np.ndarray, from_means: FromMeans, seed: int = 0) -> Estimate:
    """The metric over one cell's queries, with a percentile-bootstrap interval over queries."""
    value = float(from_means(rows.mean(0)))
    if len(rows) < 2:
        return Estimate(value, value, value)
    result = stats.bootstrap((np.arange(len(rows)),), _statistic(rows, from_means), vectorized=True,
                             n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                             rng=np.random.default_rng(seed))
    return Estimate(value, float(result.confidence_interval.low), float(result.confidence_interval.high))


@dataclass(frozen=True)
class Comparison:
    difference: float  # a - b
    low: float
    high: float
    p_value: float


def replicates(cells: Sequence[np.ndarray], from_means: FromMeans, rng: np.random.Generator) -> np.ndarray:
    """(RESAMPLES, len(cells)) metric values; every replicate draws the SAME queries in every cell, so cells of
    different methods on the same queries stay paired."""
    n = len(cells[0])
    if any(len(c) != n for c in cells):
        raise ValueError("paired cells must hold the same queries")
    index = rng.integers(0, n, size=(RESAMPLES, n))
    return np.stack([from_means(c[index].mean(axis=1)) for c in cells], axis=1)


def interval_of(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, from_means: FromMeans, seed: int = 0) -> Comparison:
    """Method a minus method b on the SAME queries (row i of a and of b is one query): paired bootstrap, with a
    two-sided p-value from the bootstrap distribution of the difference."""
    draws = replicates([a, b], from_means, np.random.default_rng(seed))
    return _comparison(float(from_means(a.mean(0)) - from_means(b.mean(0))), draws[:, 0] - draws[:, 1])


def _comparison(difference: float, draws: np.ndarray) -> Comparison:
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0)))
    return Comparison(difference, *interval_of(draws), float(p))


def paired_average(pairs: Sequence[tuple[np.ndarray, np.ndarray]], from_means: Sequence[FromMeans],
                   seed: int = 0) -> Comparison:
    """The mean over tasks of (a - b), each task's queries resampled alike for a and b."""
    return paired_contrast(pairs, (1.0, -1.0), from_means, seed)


def paired_contrast(tasks: Sequence[Sequence[np.ndarray]], weights: Sequence[float], from_means: Sequence[FromMeans],
                    seed: int = 0, unit_weights: Sequence[float] | None = None) -> Comparison:
    """The mean over tasks of sum_i weights[i] * metric(tasks[t][i]), the cells of a task holding the same queries
    and resampled alike: (a, b) with (1, -1) is a − b; (a1, b1, a0, b0) with (1, -1, -1, 1) is how much a − b
    changed from condition 0 to condition 1, paired throughout. ``unit_weights`` (default: equal) weigh the units
    instead of a plain mean: a unit is then one seed of a task, so that a task's seeds are averaged as the
    tables average them (a metric such as macro-F1 of two seeds' pooled queries is not the mean of the two)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)
    u = np.full(len(tasks), 1 / len(tasks)) if unit_weights is None else np.asarray(unit_weights, dtype=float)
    value = float(sum(ui * sum(wi * f(c.mean(0)) for wi, c in zip(w, cells))
                      for ui, cells, f in zip(u, tasks, from_means)))
    draws = [replicates(list(cells), f, rng) @ w for cells, f in zip(tasks, from_means)]
    return _comparison(value, u @ np.asarray(draws))


def significant(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which comparisons of one table are significant after Benjamini-Hochberg."""
    if not p_values:
        return []
    return [bool(q < alpha) for q in stats.false_discovery_control(np.asarray(p_values, dtype=float))]


def average_interval(tasks: Sequence[Sequence[np.ndarray]], from_means: Sequence[FromMeans], seed: int = 0) -> Estimate:
    """Mean over tasks of (mean over demonstration seeds of the cell metric), resampling seeds and queries.

    ``tasks[t]`` holds the rows of task t's cells, one per seed; ``from_means[t]`` is task t's metric.
    """
    rng = np.random.default_rng(seed)
    value = float(np.mean([np.mean([from_means[t](c.mean(0)) for c in cells]) for t, cells in enumerate(tasks)]))
    per_task = []
    for t, cells in enumerate(tasks):
        draws = np.stack([replicates([c], from_means[t], rng)[:, 0] for c in cells])  # (seeds, RESAMPLES)
        drawn = rng.integers(0, len(cells), size=(RESAMPLES, len(cells)))  # seeds drawn with replacement
        per_task.append(draws[drawn, np.arange(RESAMPLES)[:, None]].mean(axis=1))
    return Estimate(value, *interval_of(np.mean(per_task, axis=0)))
