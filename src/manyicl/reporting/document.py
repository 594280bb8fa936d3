"""The report of a compare run, from results.json and the per-query rows in predictions/: every number with its
95 % interval, differences marked only where a paired test on the same queries says so, and the cells where one
label takes nearly all predictions listed (they measure the demonstrations' label mix, not the model). Also the
console table of a run and the evaluation summary of each model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from manyicl.evaluation.records import CellRecord, read_cell_records
from manyicl.files import write_atomic
from manyicl.reporting.analysis import average, cell_at, headline_shots, load_cells, methods_of, tasks_of
from manyicl.reporting.context import report_context
from manyicl.reporting.plots import draw_figures
from manyicl.reporting.sections import SECTIONS
from manyicl.reporting.text import fmt


def write_report(run_dir: str | Path) -> Path:
    """<run_dir>/report.md and its figures under plots/, from the run's records."""
    run_dir = Path(run_dir)
    ctx = report_context(run_dir)
    lines = [f"# ManyICL comparison: {run_dir.name}", ""]
    for section in SECTIONS:
        lines += section(ctx)
    figures = draw_figures(ctx)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in figures] + [""]
    lines += ["All records: [results.json](results.json); predictions and per-query rows per cell under "
              "`predictions/`.", ""]
    report = run_dir / "report.md"
    write_atomic(report, "\n".join(lines))
    return report


def summary_table(results: list[dict[str, Any]], run_dir: str | Path) -> str:
    """The console table of records as results.json holds them (what run_evaluation returns): per (method, task,
    shots), the mean over seeds with its 95 % interval (seeds and queries resampled)."""
    where = Path(run_dir) / "results.json"
    records = [CellRecord.from_json(r, f"{where}: record {i + 1}") for i, r in enumerate(results)]
    lines = [f"{'method':<18} {'task':<22} {'shots':>6} {'used':>5} {'metric':<14} {'value [95% CI]':>24} {'n':>5} "
             f"{'seeds':>5} {'skip':>4} {'s/query':>8}"]
    for (method, task, k), cell in load_cells(Path(run_dir), records).items():
        rs = cell.records
        per_query = sum(r.seconds for r in rs) / max(sum(r.n for r in rs), 1)
        flag = " ⚠" if cell.collapsed else ""
        lines.append(f"{method:<18} {task:<22} {k:>6} {cell.shots:>5} {rs[0].metric:<14} "
                     f"{fmt(cell.estimate()):>24} {rs[0].n:>5} {len(rs):>5} "
                     f"{sum(r.skipped for r in rs):>4} {per_query:>8.3f}{flag}")
    if any(r.is_collapsed for r in records):
        lines.append("⚠ one label takes >= 90 % of the predictions in a seed of this cell "
                     "(its histogram is in results.json)")
    return "\n".join(lines)


def method_summaries(run_dir: Path) -> dict[str, list[str]]:
    """Per method, the markdown a model card shows: the held-out tasks at the headline shot count with 95 %
    intervals, and their average, from the run's results.json."""
    records = read_cell_records(run_dir / "results.json")
    held = tasks_of(records, "held_out")
    if not held:
        return {}
    cells, shots = load_cells(run_dir, records), headline_shots(records)
    summaries = {}
    for m in methods_of(records):
        rows = [(t, cell_at(cells, m, t, shots)) for t in held]
        lines = [f"Held-out tasks (never trained on) at {shots} shots, from `manyicl compare` ({run_dir.name}); "
                 "mean over demonstration seeds with its 95 % interval:", "", "| task | metric | value |",
                 "|---|---|---:|"]
        lines += [f"| {t} | {c.first.metric} | {fmt(c.estimate())} |" for t, c in rows if c]
        lines += [f"| **average** | | **{fmt(average(cells, m, held, shots))}** |"]
        summaries[m] = lines
    return summaries
