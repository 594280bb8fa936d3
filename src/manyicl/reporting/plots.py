"""The report's figures, one function each, drawn from the report context into <run>/plots/ (matplotlib, Agg):
each returns the path it wrote, or None when the run has nothing for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from manyicl.files import save_figure
from manyicl.methods import REFERENCE, UNTUNED
from manyicl.reporting.analysis import average, shots_key
from manyicl.reporting.context import ReportContext
from manyicl.reporting.curves import curve_band, curve_methods
from manyicl.reporting.training import MIXTURE, running_mean, training_groups

Figure = Callable[[ReportContext], Path | None]

# One colour per method in every figure, whichever methods a figure (or a partial run) has, so that a reader can
# match lines across figures; base, many_shot_last_ft, manyicl and task_level keep the colours they always had.
METHOD_COLOURS = {"base": "C0", "zero_shot_ft": "C4", "few_shot_ft": "C5", "many_shot_last_ft": "C1", "manyicl": "C2",
                  "task_level": "C3"}


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "C7")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, run_dir: Path, name: str) -> Path:
    path = run_dir / "plots" / name
    path.parent.mkdir(exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def _panels(plt: Any, count: int, height: float) -> tuple[Any, Any]:
    """Up to three panels a row, the unused ones blank."""
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def _legend_below(fig: Any, handles: dict[str, Any], methods: list[str]) -> None:
    """One legend for the figure: a panel may lack a method (a partial run)."""
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
               loc="lower center", ncol=max(1, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the legend below the panels


def shot_scaling(ctx: ReportContext) -> Path | None:
    """Metric against shots, one panel per held-out task, one line per method with its 95 % band (the paper's
    shot-scaling figure); task_level as a dotted line at its 0-shot value."""
    tasks, cells, methods = ctx.held_out, ctx.cells, ctx.methods
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(tasks), 3.6)
    handles = {}
    for ax, t in zip(axes.flat, tasks):
        first = next(c for (_, tt, _), c in cells.items() if tt == t).first
        for m in methods:
            if m == REFERENCE and (m, t, "0") in cells:
                e = cells[m, t, "0"].estimate()
                handles[m] = ax.axhline(e.value, color=method_colour(m), linestyle=":", label=m)
                if not np.isnan(e.low):
                    ax.axhspan(e.low, e.high, color=method_colour(m), alpha=0.08)
                continue
            # by shots used; two requests may use the same number (32 and max when only 26 fit): both are drawn
            ordered = sorted(((c.shots, shots_key(k)), c) for (mm, tt, k), c in cells.items() if mm == m and tt == t)
            points = [(c.shots, c.estimate()) for _, c in ordered]
            if not points:
                continue
            xs = [max(x, 0.5) for x, _ in points]
            handles[m], = ax.plot(xs, [e.value for _, e in points], marker="o", color=method_colour(m), label=m)
            ax.fill_between(xs, [e.low for _, e in points], [e.high for _, e in points], color=method_colour(m),
                            alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{t} ({first.family})")
        ax.set_xlabel("demonstrations in context (0 plotted at 0.5)")
        ax.set_ylabel(first.metric)
    _legend_below(fig, handles, methods)
    return _save(plt, fig, ctx.run_dir, "shot_scaling.png")


def methods_by_family(ctx: ReportContext) -> Path | None:
    """The held-out tasks' mean per family at the headline shot count, one bar per method with its 95 % interval."""
    if not ctx.held_out:
        return None
    plt = _pyplot()
    families: dict[str, list[str]] = {}
    for t in ctx.held_out:
        families.setdefault(next(c for (_, tt, _), c in ctx.cells.items() if tt == t).first.family, []).append(t)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families) + 2), 3.8))
    width = 0.8 / len(ctx.methods)
    for i, m in enumerate(ctx.methods):
        estimates = [average(ctx.cells, m, members, ctx.shots) for members in families.values()]
        heights = [e.value if e else np.nan for e in estimates]  # no bar where a method lacks a task of the family
        errors = [[e.value - e.low if e else 0.0 for e in estimates],
                  [e.high - e.value if e else 0.0 for e in estimates]]
        ax.bar([j + i * width for j in range(len(families))], heights, width, yerr=errors, capsize=2, label=m,
               color=method_colour(m))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], list(families))
    ax.set_ylabel("mean primary metric (95 % interval)")
    ax.set_title(f"Held-out tasks by family at {ctx.shots} shots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, ctx.run_dir, "methods_by_family.png")


def learning_curves(ctx: ReportContext) -> Path | None:
    """NLL per answer token against k, one panel per task (held-out first), one line per method with its band."""
    curves = ctx.learning_curves
    if not curves:
        return None
    plt = _pyplot()
    methods = curve_methods(curves)
    role = {t: c.role for (_, t), c in reversed(list(curves.items()))}  # each task's first curve says its role
    tasks = sorted(role, key=lambda t: (role[t], t))
    fig, axes = _panels(plt, len(tasks), 3.4)
    handles = {}
    for ax, t in zip(axes.flat, tasks):
        for m in methods:
            c = curves.get((m, t))
            if c is None:
                continue
            mean, low, high = curve_band(c)
            ks = np.arange(1, c.last_k + 1)
            handles[m], = ax.plot(ks, mean, color=method_colour(m), label=m, linewidth=1.2)
            ax.fill_between(ks, low, high, color=method_colour(m), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{t} ({role[t].replace('_', ' ')})")
        ax.set_xlabel("answer k (k − 1 answers before it)")
        ax.set_ylabel("NLL per answer token")
    _legend_below(fig, handles, methods)
    return _save(plt, fig, ctx.run_dir, "learning_curves.png")


def budget_curve(ctx: ReportContext) -> Path | None:
    """The held-out average of each mixture fine-tune against the tokens it had trained on, from base at 0."""
    budget = ctx.budget
    if budget is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in budget.trained:
        points = [(budget.tokens[m, s], budget.averages[m, s]) for s in budget.steps if budget.averages[m, s]]
        if budget.base is not None:  # 0 tokens: the untuned model
            points = [(0, budget.base)] + points
        xs = np.array([x for x, _ in points]) / 1e6
        ax.plot(xs, [e.value for _, e in points], marker="o", color=method_colour(m), label=m)
        ax.fill_between(xs, [e.low for _, e in points], [e.high for _, e in points], color=method_colour(m),
                        alpha=0.15)
    if budget.base is not None:
        ax.axhline(budget.base.value, color=method_colour(UNTUNED), linestyle=":", label=UNTUNED)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"held-out average at {budget.shots} shots (95 % band)")
    ax.set_title("Held-out average against training budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, ctx.run_dir, "budget_curve.png")


def training_curves(ctx: ReportContext) -> Path | None:
    """Every fine-tune's loss by step (running mean): the mixture fine-tunes, and the per-task ones beside them."""
    groups = training_groups(ctx.training_logs)
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    tasks = plt.get_cmap("tab20").colors  # the per-task fine-tunes: 11 held-out tasks outrun the 10 default colours
    for ax, (group, runs) in zip(axes.flat, groups.items()):
        for i, (name, log) in enumerate(runs.items()):
            steps, smooth = running_mean(log)
            ax.plot(steps, smooth, label=name,
                    color=method_colour(name) if group == MIXTURE else tasks[i % len(tasks)])
        ax.set_title("mixture fine-tunes" if group == MIXTURE else "task_level (one per held-out task)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (running mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, ctx.run_dir, "training_curves.png")


FIGURES: tuple[Figure, ...] = (shot_scaling, methods_by_family, learning_curves, budget_curve, training_curves)


def draw_figures(ctx: ReportContext) -> list[Path]:
    """Every figure the run has data for, in report order."""
    return [path for figure in FIGURES if (path := figure(ctx)) is not None]
