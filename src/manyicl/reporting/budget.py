"""The report's training-budget curve: every mixture fine-tune evaluated from its checkpoints at the earlier budget
points (compare.budgets -> budgets/step-<N>/) and at the end, against the tokens it had trained on by then.

At 0 tokens every fine-tune is the untuned model (a LoRA starts as the identity), so each method's curve starts at
base. Differences are paired on the same queries and demonstrations (the prompts do not depend on the model).
Statistics first (budget_curve), then the markdown (budget_lines); the figure is plots.budget_curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manyicl.evaluation.curves import CURVES_FILE, load_curves
from manyicl.evaluation.records import read_cell_records
from manyicl.files import logged_tokens
from manyicl.methods import METHODS, REFERENCE, SUBJECT, UNTUNED
from manyicl.reporting.analysis import (
    Cells,
    PairedTest,
    average,
    contrast_over,
    load_cells,
    paired_over,
    significance,
)
from manyicl.reporting.curves import average_difference_at_last_k, curve_table
from manyicl.reporting.text import fmt, fmt_difference
from manyicl.uncertainty import Estimate

BUDGETS_DIR = "budgets"
BASELINES = tuple(name for name, m in METHODS.items() if m.role == "baseline")  # compared with the subject


def budget_dirs(run_dir: Path) -> dict[int, Path]:
    """step -> budgets/step-<step>, for the budget points that have results."""
    found = {}
    for d in (run_dir / BUDGETS_DIR).glob("step-*"):
        if (d / "results.json").exists() and d.name[5:].isdigit():
            found[int(d.name[5:])] = d
    return dict(sorted(found.items()))


def trained_tokens(run_dir: Path, method: str, step: int | None = None) -> int | None:
    """Tokens a fine-tune had trained on after ``step`` (all its steps: None), from its train_log.jsonl."""
    log = run_dir / "train" / method / "train_log.jsonl"
    if not log.exists():
        return None
    return logged_tokens(log, step)


@dataclass(frozen=True)
class BudgetCurve:
    """The held-out average of every mixture fine-tune at each budget point (the last: the final model)."""

    shots: str
    tasks: list[str]
    steps: list[int]
    trained: list[str]  # the mixture fine-tunes with a training log
    averages: dict[tuple[str, int], Estimate | None]  # (method, step)
    base: Estimate | None  # the untuned model: every curve at 0 tokens
    tokens: dict[tuple[str, int], int]  # (method, step): tokens trained on by then
    subject: dict[tuple[str, int], PairedTest | None]  # (rival, step): subject − rival, BH over the table
    # rival: (subject − rival at the last step) − (at the first), BH over the rivals: does the difference grow?
    growth: dict[str, PairedTest | None]
    curves: dict[tuple[str, int], Estimate | None]  # (baseline, step): subject − it on the learning curves


def budget_curve(run_dir: Path, cells: Cells, methods: list[str], tasks: list[str], shots: str,
                 final_step: int | None) -> BudgetCurve | None:
    """None when the run has no earlier budget point or no held-out task."""
    dirs = budget_dirs(run_dir)
    if not dirs or not tasks:
        return None
    trained = [m for m in methods if (run_dir / "train" / m / "train_log.jsonl").exists() and m != REFERENCE]
    base_cells = {k: c for k, c in cells.items() if k.method == UNTUNED}
    points: dict[int, Cells] = {}  # step -> that budget's cells, with base's (the same prompts)
    for step, d in dirs.items():
        points[step] = {**base_cells, **load_cells(d, read_cell_records(d / "results.json"))}
    if final_step is not None:
        points[final_step] = cells
    steps = sorted(points)
    subject: dict[tuple[str, int], PairedTest | None] = {}
    growth: dict[str, PairedTest | None] = {}
    if SUBJECT in trained:
        rivals = [UNTUNED] + [m for m in trained if m != SUBJECT]
        keys = [(m, s) for m in rivals for s in steps]
        found = [paired_over(points[s], SUBJECT, m, tasks, shots) for m, s in keys]
        subject = {k: PairedTest(c, mark) if c else None for k, c, mark in zip(keys, found, significance(found))}
        first, last = points[steps[0]], points[steps[-1]]
        changes = [contrast_over([(last, SUBJECT, shots), (last, m, shots), (first, SUBJECT, shots), (first, m, shots)],
                                 (1, -1, -1, 1), tasks) if len(steps) > 1 else None for m in rivals]
        growth = {m: PairedTest(c, mark) if c else None for m, c, mark in zip(rivals, changes, significance(changes))}
    return BudgetCurve(
        shots, tasks, steps, trained, {(m, s): average(points[s], m, tasks, shots) for m in trained for s in steps},
        average(cells, UNTUNED, tasks, shots),
        {(m, s): trained_tokens(run_dir, m, s) or 0 for m in trained for s in steps}, subject, growth,
        _curve_differences(run_dir, dirs, final_step, steps) if subject else {})


def _curve_differences(run_dir: Path, dirs: dict[int, Path], final_step: int | None,
                       steps: list[int]) -> dict[tuple[str, int], Estimate | None]:
    """The subject − each baseline on the learning curves at each held-out task's last k, per budget."""
    main = load_curves(run_dir / CURVES_FILE)
    base = [r for r in main if r["method"] == UNTUNED]
    tables = {s: curve_table(base + load_curves(d / CURVES_FILE)) for s, d in dirs.items()}
    if final_step is not None:
        tables[final_step] = curve_table(main)
    found = {}
    for m in BASELINES:
        for s in steps:
            curves = tables.get(s, {})
            held = sorted({t for (_, t), c in curves.items() if c.role == "held_out"})
            found[m, s] = average_difference_at_last_k(curves, SUBJECT, m, held) if held else None
    return found


def _schedule_note(run_config: dict[str, Any]) -> str:
    schedule = (run_config.get("training") or {}).get("lr_scheduler", "cosine")
    if schedule.startswith("constant"):
        return (f"The learning rate is constant after warm-up ({schedule}), so the checkpoint at a step is what a run "
                "of that budget would have made.")
    return (f"⚠ The learning rate follows {schedule}: an earlier checkpoint was trained at a higher rate than a run of "
            "that budget would end with, so these points are not shorter runs.")


def budget_lines(budget: BudgetCurve | None, run_config: dict[str, Any]) -> list[str]:
    """The markdown of the budget section; nothing when the run has no earlier budget point."""
    if budget is None:
        return []
    steps, trained = budget.steps, budget.trained
    header = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    lines = [f"## Training budget: the held-out average against training tokens ({budget.shots} shots)", "",
             f"Each mixture fine-tune evaluated from its checkpoints at steps {', '.join(map(str, steps))} "
             f"(the last: the final model), on the same {len(budget.tasks)} held-out tasks, queries and "
             "demonstrations; "
             f"mean with its 95 % interval. {_schedule_note(run_config)} base (0 tokens): " + fmt(budget.base) + ".",
             "", *header]
    lines += [f"| {m} | " + " | ".join(fmt(budget.averages[m, s]) for s in steps) + " |" for m in trained]
    lines += ["", "Tokens trained on by each step (train_log.jsonl):", "", *header]
    lines += [f"| {m} | " + " | ".join(f"{budget.tokens[m, s]:,}" for s in steps) + " |" for m in trained]
    if budget.subject:
        rivals = list(dict.fromkeys(m for m, _ in budget.subject))
        lines += ["", f"{SUBJECT} − method at each budget, paired on the same queries and seeds (95 % interval, p; "
                  "**bold**: significant after Benjamini-Hochberg over this table; base is the untuned model at every "
                  "column):", "", *header]
        for m in rivals:
            tests = [budget.subject[m, s] for s in steps]
            lines.append(f"| {m} | " + " | ".join(fmt_difference(t.comparison if t else None, bool(t and t.significant),
                                                                 p_value=True) for t in tests) + " |")
        lines += _growth_lines(budget)
        lines += _curve_difference_lines(budget)
    return lines + [""]


def _growth_lines(budget: BudgetCurve) -> list[str]:
    """Does the subject's advantage grow with the budget: its difference at the last step minus at the first."""
    tests = {m: t for m, t in budget.growth.items() if t is not None}
    if not tests:
        return []
    first, last = budget.steps[0], budget.steps[-1]
    return ["", f"Does the difference grow with the budget? ({SUBJECT} − method at step {last}) − ({SUBJECT} − method "
            f"at step {first}), paired on the same queries and seeds (95 % interval, p; **bold**: significant after "
            f"Benjamini-Hochberg over these rows; against {UNTUNED}, the untuned model, it is {SUBJECT}'s own change):",
            "", f"| method | step {last} − step {first} |", "|---|---:|",
            *(f"| {m} | {fmt_difference(t.comparison, t.significant, p_value=True)} |" for m, t in tests.items())]


def _curve_difference_lines(budget: BudgetCurve) -> list[str]:
    steps = budget.steps
    rows = []
    for m in BASELINES:
        cols = [budget.curves[m, s] for s in steps]
        if all(e is None for e in cols):  # a baseline this run did not measure: no row
            continue
        rows.append(f"| {m} | " + " | ".join("—" if e is None else f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"
                                              for e in cols) + " |")
    if not rows:
        return []
    return ["", f"In-context learning curves at each budget: {SUBJECT} − method in NLL per answer token at each "
            "held-out task's last k, averaged over the tasks, paired by sequence (negative: "
            f"{SUBJECT} predicts the answers better):", "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps), *rows]
