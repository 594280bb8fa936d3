"""Everything the report's sections and figures read, gathered once from a run folder: its records and cells, the
tasks by role, the headline shot count, the groups of tasks averaged, and the statistics more than one section
uses (paired comparisons, gap closed, budget curve), so that every section is a function of this one context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manyicl.errors import ManyICLError
from manyicl.evaluation.records import CellRecord, read_cell_records
from manyicl.reporting.analysis import (
    Cells,
    GapTable,
    SubjectComparisons,
    TaskGroup,
    averaged_groups,
    gap_closed,
    headline_shots,
    load_cells,
    methods_of,
    subject_comparisons,
    tasks_of,
)
from manyicl.reporting.budget import BudgetCurve, budget_curve
from manyicl.reporting.curves import Curve, load_curve_table
from manyicl.reporting.training import FineTune, fine_tunes, training_logs


@dataclass(frozen=True)
class ReportContext:
    run_dir: Path
    records: list[CellRecord]
    cells: Cells
    methods: list[str]  # in the comparison's order
    held_out: list[str]
    forgetting: list[str]
    in_distribution: list[str]
    shots: str  # the headline shot count of the held-out tasks
    distance: dict[str, str]  # held-out task -> near/far (tasks.distance); empty when the run did not say
    groups: list[TaskGroup]  # the averages every held-out table reports
    run_config: dict[str, Any]  # compare_config.yaml; empty without one
    comparisons: SubjectComparisons
    gaps: GapTable
    learning_curves: dict[tuple[str, str], Curve]
    budget: BudgetCurve | None
    training_logs: dict[str, list[dict]]  # fine-tune (train/<name>) -> its train_log.jsonl, the empty ones left out
    fine_tunes: dict[str, FineTune]  # the finished mixture fine-tunes, in method order


def run_records(run_dir: Path) -> list[CellRecord]:
    """The records of a run's results.json, any schema version; a missing or empty file is an error."""
    path = run_dir / "results.json"
    if not path.exists():
        raise ManyICLError(f"{run_dir}: no results.json; run manyicl compare or manyicl eval first")
    records = read_cell_records(path, "evaluate again")
    if not records:
        raise ManyICLError(f"{path}: holds no results yet")
    return records


def run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "compare_config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


def _final_step(run_dir: Path) -> int | None:
    """The steps of the mixture fine-tunes (the final budget point), from their train summaries."""
    for summary in sorted((run_dir / "train").glob("*/train_summary.json")):
        return json.loads(summary.read_text())["steps"]
    return None


def report_context(run_dir: Path) -> ReportContext:
    """The context of a run folder: its results.json, per-query rows, compare_config.yaml, curves and logs."""
    records = run_records(run_dir)
    return build_context(run_dir, records, load_cells(run_dir, records), run_config(run_dir),
                         load_curve_table(run_dir), training_logs(run_dir))


def build_context(run_dir: Path, records: list[CellRecord], cells: Cells, config: dict[str, Any] | None = None,
                  learning_curves: dict[tuple[str, str], Curve] | None = None,
                  logs: dict[str, list[dict]] | None = None) -> ReportContext:
    """The context of records and cells already read; the budget points and fine-tunes are read from ``run_dir``."""
    config = config or {}
    methods = methods_of(records)
    held = tasks_of(records, "held_out")
    shots = headline_shots(records) if held else "0"
    distance = dict((config.get("tasks") or {}).get("distance") or {})
    groups = averaged_groups(held, distance)
    # the earlier budget points were evaluated at the first of compare.budget_shots
    budget_shots = str(((config.get("compare") or {}).get("budget_shots") or [shots])[0])
    return ReportContext(
        run_dir=run_dir, records=records, cells=cells, methods=methods, held_out=held,
        forgetting=tasks_of(records, "forgetting"), in_distribution=tasks_of(records, "in_distribution"),
        shots=shots, distance=distance, groups=groups, run_config=config,
        comparisons=subject_comparisons(cells, methods, held, shots, groups),
        gaps=gap_closed(cells, held, shots, groups), learning_curves=learning_curves or {},
        budget=budget_curve(run_dir, cells, methods, held, budget_shots, _final_step(run_dir)),
        training_logs=logs or {}, fine_tunes=fine_tunes(run_dir, methods),
    )
