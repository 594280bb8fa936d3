"""The report's training-budget curve: every mixture fine-tune evaluated from its checkpoints at the earlier budget
points (compare.budgets -> budgets/step-<N>/) and at the end, against the tokens it had trained on by then.

At 0 tokens every fine-tune is the untuned model (a LoRA starts as the identity), so each method's curve starts at
base. Differences are paired on the same queries and demonstrations (the prompts do not depend on the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from manyicl.curve_report import average_difference_at_last_k, curve_table
from manyicl.evaluation.curves import CURVES_FILE, load_curves
from manyicl.files import logged_tokens, save_figure
from manyicl.methods import METHODS, REFERENCE, SUBJECT, UNTUNED
from manyicl.uncertainty import Estimate, significant

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


def budget_sections(run_dir: Path, cells: dict, methods: list[str], tasks: list[str], shots: str,
                    final_step: int | None) -> tuple[list[str], list[Path]]:
    """The markdown of the budget section and its plot; nothing when the run has no earlier budget point."""
    from manyicl import report  # the cell statistics (report imports this module)

    dirs = budget_dirs(run_dir)
    if not dirs or not tasks:
        return [], []
    trained = [m for m in methods if (run_dir / "train" / m / "train_log.jsonl").exists() and m != REFERENCE]
    base_cells = {k: c for k, c in cells.items() if k[0] == UNTUNED}
    points: dict[int, dict] = {}  # step -> that budget's cells, with base's (the same prompts)
    for step, d in dirs.items():
        results = json.loads((d / "results.json").read_text(encoding="utf-8"))
        points[step] = {**base_cells, **report.load_cells(d, results)}
    if final_step is not None:
        points[final_step] = cells
    steps = sorted(points)
    averages = {(m, s): report._average(points[s], m, tasks, shots) for m in trained for s in steps}
    base = report._average(cells, UNTUNED, tasks, shots)
    lines = [f"## Training budget: the held-out average against training tokens ({shots} shots)", "",
             f"Each mixture fine-tune evaluated from its checkpoints at steps {', '.join(map(str, steps))} "
             f"(the last: the final model), on the same {len(tasks)} held-out tasks, queries and demonstrations; "
             f"mean with its 95 % interval. {_schedule_note(run_dir)} base (0 tokens): " + report._fmt(base) + ".", "",
             "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for m in trained:
        lines.append(f"| {m} | " + " | ".join(report._fmt(averages[m, s]) for s in steps) + " |")
    lines += ["", "Tokens trained on by each step (train_log.jsonl):", "",
              "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for m in trained:
        lines.append(f"| {m} | " + " | ".join(f"{trained_tokens(run_dir, m, s) or 0:,}" for s in steps) + " |")
    if SUBJECT in trained:
        rivals = [UNTUNED] + [m for m in trained if m != SUBJECT]
        table = [(m, s, report._paired_over(points[s], SUBJECT, m, tasks, shots)) for m in rivals for s in steps]
        marks = iter(significant([c.p_value for *_, c in table if c is not None]))
        found = {(m, s): (c, c is not None and next(marks)) for m, s, c in table}
        lines += ["", f"{SUBJECT} − method at each budget, paired on the same queries and seeds (95 % interval, p; "
                  "**bold**: significant after Benjamini-Hochberg over this table; base is the untuned model at every "
                  "column):", "", "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for m in rivals:
            lines.append(f"| {m} | " + " | ".join(report._fmt_difference(*found[m, s], p_value=True) for s in steps)
                         + " |")
        lines += _curve_differences(run_dir, dirs, final_step, steps)
    plot = _budget_plot(run_dir, trained, steps, averages, base, shots)
    return lines + [""], [plot]


def _schedule_note(run_dir: Path) -> str:
    from manyicl.report import _run_config

    schedule = (_run_config(run_dir).get("training") or {}).get("lr_scheduler", "cosine")
    if schedule.startswith("constant"):
        return (f"The learning rate is constant after warm-up ({schedule}), so the checkpoint at a step is what a run "
                "of that budget would have made.")
    return (f"⚠ The learning rate follows {schedule}: an earlier checkpoint was trained at a higher rate than a run of "
            "that budget would end with, so these points are not shorter runs.")


def _curve_differences(run_dir: Path, dirs: dict[int, Path], final_step: int | None, steps: list[int]) -> list[str]:
    """The subject − each baseline on the learning curves at each held-out task's last k, per budget."""
    main = load_curves(run_dir / CURVES_FILE)
    base = [r for r in main if r["method"] == UNTUNED]
    tables = {s: curve_table(base + load_curves(d / CURVES_FILE)) for s, d in dirs.items()}
    if final_step is not None:
        tables[final_step] = curve_table(main)
    rows = []
    for m in BASELINES:
        cols = []
        for s in steps:
            curves = tables.get(s, {})
            held = sorted({t for (_, t), c in curves.items() if c.role == "held_out"})
            e = average_difference_at_last_k(curves, SUBJECT, m, held) if held else None
            cols.append("—" if e is None else f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]")
        rows.append(f"| {m} | " + " | ".join(cols) + " |")
    rows = [row for row in rows if row.count("—") < len(steps)]  # baselines this run did not measure: no row
    if not rows:
        return []
    return ["", f"In-context learning curves at each budget: {SUBJECT} − method in NLL per answer token at each "
            "held-out task's last k, averaged over the tasks, paired by sequence (negative: "
            f"{SUBJECT} predicts the answers better):", "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps), *rows]


def _budget_plot(run_dir: Path, methods: list[str], steps: list[int], averages: dict, base: Estimate | None,
                 shots: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, m in enumerate(methods):
        points = [(trained_tokens(run_dir, m, s) or 0, averages[m, s]) for s in steps if averages[m, s]]
        if base is not None:  # 0 tokens: the untuned model
            points = [(0, base)] + points
        xs = np.array([x for x, _ in points]) / 1e6
        ax.plot(xs, [e.value for _, e in points], marker="o", color=f"C{i + 1}", label=m)
        ax.fill_between(xs, [e.low for _, e in points], [e.high for _, e in points], color=f"C{i + 1}", alpha=0.15)
    if base is not None:
        ax.axhline(base.value, color="C0", linestyle=":", label=UNTUNED)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"held-out average at {shots} shots (95 % band)")
    ax.set_title("Held-out average against training budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "plots" / "budget_curve.png"
    path.parent.mkdir(exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path
