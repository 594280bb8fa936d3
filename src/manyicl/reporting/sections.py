"""The report's sections, in report order: each a function of the one report context, returning its markdown lines
([] when the run has nothing for it). The numbers come from analysis.py; here they are only arranged and written."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from manyicl.methods import REFERENCE, SUBJECT, UNTUNED
from manyicl.reporting.analysis import (
    average,
    averaged_groups,
    cell_at,
    collapsed_tasks,
    headline_shots,
    majority_score,
    method_ordering,
    paired_over,
    requested_shots,
    shots_key,
    significance,
)
from manyicl.reporting.budget import budget_lines
from manyicl.reporting.context import ReportContext
from manyicl.reporting.curves import curve_sections
from manyicl.reporting.text import fmt, fmt_difference, fmt_gap
from manyicl.reporting.training import MIXTURE, loss_summary, training_groups

Section = Callable[[ReportContext], list[str]]


def findings(ctx: ReportContext) -> list[str]:
    """What the run found, in two sentences: ManyICL's held-out average, which methods it beats, trails or cannot
    be told from (paired tests), and how much of the gap to the dedicated fine-tune it closes."""
    tasks, shots = ctx.held_out, ctx.shots
    if SUBJECT not in ctx.methods or not tasks:
        return []
    subject = average(ctx.cells, SUBJECT, tasks, shots)
    # the verdicts on the average over the held-out tasks, or on the one task
    scope, tests = (("average", ctx.comparisons.per_group) if len(tasks) > 1 else (tasks[0], ctx.comparisons.per_task))
    verdicts: dict[str, list[str]] = {"better than": [], "worse than": [], "not distinguishable from": []}
    for (m, t), test in tests.items():
        if t == scope:
            c = test.comparison
            kind = ("not distinguishable from" if not test.significant
                    else ("better than" if c.difference > 0 else "worse than"))
            verdicts[kind].append(f"{m} ({c.difference:+.3f})")
    said = "; ".join(f"{kind} {', '.join(ms)}" for kind, ms in verdicts.items() if ms)
    group_averages = [(name, members, average(ctx.cells, SUBJECT, members, shots)) for name, members in ctx.groups
                      if name != "average"]
    parts = [f"{len(members)} {name.split()[0]}: {fmt(e)}" for name, members, e in group_averages if e]
    first = (f"On {len(tasks)} held-out task{'s' if len(tasks) > 1 else ''} at {shots} shots ManyICL scores "
             f"{fmt(subject) if subject else '–'} on average{' (' + '; '.join(parts) + ')' if parts else ''}: "
             f"{said or 'no other method to compare with'} (paired tests on the same queries, Benjamini-Hochberg).")
    overall = ctx.gaps.headline()
    second = (f"Against a dedicated fine-tune per task it closes {fmt_gap(overall)} of the gap from the untuned model "
              f"on {'the held-out average' if len(tasks) > 1 else tasks[0]} (per task and per group below)."
              if overall else "No task has a dedicated fine-tune (task_level) here, so no gap-closed figure is given.")
    return ["## What this run found", "", first + " " + second, ""]


def setup(ctx: ReportContext) -> list[str]:
    records = ctx.records
    queries = sorted({r.n for r in records})
    seeds = sorted({r.seed for r in records})
    scorings = ", ".join(sorted({r.scoring for r in records if r.scoring})) or "–"
    lines = [f"Model: `{records[0].model}`. Demonstration seeds: {seeds}. "
             f"Queries per cell: {', '.join(map(str, queries))}. "
             f"Context budget at evaluation: {records[0].max_tokens} tokens. "
             f"Label candidates ranked by: {scorings}. "
             "Queries too long for the context (scored as wrong, kept in every denominator): "
             f"{sum(r.skipped for r in records)}.", "",
             "Every value is the mean over demonstration seeds with its 95 % interval [low, high] (bootstrap over "
             "seeds and queries). ⚠ marks a cell where one label took ≥ 90 % of the predictions in some seed.", ""]
    if max(queries) < 200 or len(seeds) < 3:
        lines += ["This run uses fewer queries or demonstration seeds than the defaults (200 queries, 3 seeds) where "
                  "its test splits have more: its intervals are wider than a full run's.", ""]
    rows = []
    for m, (s, counts) in ctx.fine_tunes.items():
        never = [t for t, c in counts.items() if not c["sequences"]]
        trained = f"{len(counts) - len(never)} of {len(counts)}" + (f" (none of {', '.join(never)})" if never else "")
        rows.append(f"| {m} | {s['steps']} | {sum(c['sequences'] for c in counts.values())} | {trained} | "
                    f"{sum(c['answers'] for c in counts.values())} | {s['seconds']:.0f} |")
    if rows:
        lines += ["Training budget (identical steps, sequence length and batch for every fine-tuned method; "
                  "mixture tasks drawn: how many of the listed tasks got at least one sequence):", "",
                  "| method | steps | sequences | mixture tasks drawn | supervised answers seen | train seconds |",
                  "|---|---:|---:|---|---:|---:|", *rows, ""]
    return lines


def held_out_table(ctx: ReportContext) -> list[str]:
    tasks, methods, shots, distance = ctx.held_out, ctx.methods, ctx.shots, ctx.distance
    if not tasks:
        return []
    lines = [f"## Held-out tasks at {shots} shots", "",
             "Primary metric (task_level: its 0-shot value, the dedicated-model reference)."
             + (" near: a task of the same kind is in the mixture; far: none is." if distance else "")
             + " majority: the metric of always giving the most frequent gold answer on the same queries (label and "
               "multiple-choice tasks).", "",
             "| task | family | metric | majority | " + " | ".join(methods) + " |",
             "|---|---|---|---:|" + "---:|" * len(methods)]
    by_family: dict[str, list[str]] = {}
    floors: dict[str, float | None] = {}
    for t in tasks:
        row = [cell_at(ctx.cells, m, t, shots) for m in methods]
        first = next(c for c in row if c)
        by_family.setdefault(first.first.family, []).append(t)
        floors[t] = majority_score(first)
        kind = f" ({distance[t]})" if t in distance else ""
        lines.append(f"| {t}{kind} | {first.first.family} | {first.first.metric} | {_floor(floors[t])} | " + " | ".join(
            fmt(c.estimate()) + (" ⚠" if c.collapsed else "") if c else "–" for c in row) + " |")
    groups = sorted(by_family.items())
    if len(by_family) > 1:
        groups += [(name.replace("average", "held-out"), members)
                   for name, members in averaged_groups(tasks, distance)]
    for name, members in groups:
        floor = None if any(floors[t] is None for t in members) else float(np.mean([floors[t] for t in members]))
        lines.append(f"| **{name} average** | | | {_floor(floor)} | " + " | ".join(
            f"**{fmt(average(ctx.cells, m, members, shots))}**" for m in methods) + " |")
    return lines + [""]


def _floor(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def ordering(ctx: ReportContext) -> list[str]:
    """Which steps of the methods' ordering by held-out average the data actually resolve."""
    return _ordering(ctx, ctx.held_out, f"## Method ordering (average over the {len(ctx.held_out)} held-out tasks, "
                                        f"{ctx.shots} shots)", [])


def ordering_without_collapsed(ctx: ReportContext) -> list[str]:
    """The same ordering without the tasks where a cell measures the label mix (⚠): does it hold without them?"""
    left_out = collapsed_tasks(ctx.cells, ctx.methods, ctx.held_out, ctx.shots)
    kept = [t for t in ctx.held_out if t not in left_out]
    if not left_out or len(kept) < 2:
        return []
    return _ordering(ctx, kept, f"## Method ordering without the ⚠ tasks (average over the other {len(kept)} "
                                f"held-out tasks, {ctx.shots} shots)",
                     [f"Left out: {', '.join(left_out)}, where some method's cell has one label at ≥ 90 % of its "
                      "predictions in some seed (such a cell measures the demonstrations' label mix more than the "
                      "model). Does the ordering above hold without them?", ""])


def _ordering(ctx: ReportContext, tasks: list[str], title: str, intro: list[str]) -> list[str]:
    found = method_ordering(ctx.cells, ctx.methods, tasks, ctx.shots)
    if found is None:
        return []
    ranked = found.ranked
    chain = ranked[0]
    for a, b in zip(ranked, ranked[1:]):
        test = found.pairs.get((a, b))
        chain += (" > " if test and test.significant else " ≈ ") + b
    lines = [title, "", *intro,
             f"{chain}   (> : the neighbours differ significantly; ≈ : they cannot be told apart here)", "",
             "Every pair, higher-ranked − lower-ranked, paired on the same queries and seeds (95 % interval, p; "
             "**bold** = significant after Benjamini-Hochberg over these pairs):", "",
             "| method | average | " + " | ".join(ranked[1:]) + " |", "|---|---:|" + "---:|" * (len(ranked) - 1)]
    for a in ranked:
        tests = [found.pairs.get((a, b)) for b in ranked[1:]]
        row = [fmt_difference(t.comparison, t.significant, p_value=True) if t else "" for t in tests]
        lines.append(f"| {a} | {fmt(found.averages[a])} | " + " | ".join(row) + " |")
    return lines + [""]


def subject_against_each(ctx: ReportContext) -> list[str]:
    found = ctx.comparisons
    if not found:
        return []
    names = [name for name, _ in ctx.groups]
    scopes = [(t, found.per_task) for t in ctx.held_out] + [(name, found.per_group) for name in names]
    lines = [f"## ManyICL against each method ({ctx.shots} shots, paired on the same queries and seeds)", "",
             "Difference manyicl − method with its 95 % paired-bootstrap interval; **bold** = significant after "
             "Benjamini-Hochberg over this table (q < 0.05); otherwise the two are not distinguishable here.", "",
             "| method | " + " | ".join(ctx.held_out + names) + " |",
             "|---|" + "---:|" * (len(ctx.held_out) + len(names))]
    for m in (m for m in ctx.methods if m != SUBJECT):
        tests = [table.get((m, scope)) for scope, table in scopes]
        lines.append(f"| {m} | " + " | ".join(fmt_difference(t.comparison, t.significant) if t else "–"
                                              for t in tests) + " |")
    return lines + [""]


def gap_closed(ctx: ReportContext) -> list[str]:
    gaps = ctx.gaps
    if not gaps.per_task and not gaps.per_group:
        return []
    lines = ["## Gap closed by ManyICL", "",
             "(manyicl − base) / (task_level − base), at the headline shot count, with a 95 % interval (the same "
             "queries resampled for the three models; task_level is its 0-shot value). The averages take the gap on "
             "the average score of their tasks, so a task where task_level is below base counts there too. Here the "
             "demonstration seeds are held fixed and only queries are resampled, so the averages' intervals are "
             "narrower than the held-out table's (which also resamples seeds).", "",
             "| task | base | manyicl | task_level | gap closed |", "|---|---:|---:|---:|---:|"]
    for name, gap in [*gaps.per_task.items(), *gaps.per_group.items()]:
        label = name if gap.tasks_averaged is None else f"**{name}** ({gap.tasks_averaged} tasks)"
        lines.append(f"| {label} | " + " | ".join(fmt(e) for e in gap.estimates) + f" | {fmt_gap(gap)} |")
    return lines + [""]


def shot_scaling(ctx: ReportContext) -> list[str]:
    """The held-out average at every shot count, and what the headline shot count adds over none: the shot-scaling
    plot in numbers, so the methods' gains from demonstrations can be compared with intervals."""
    requested, shots, tasks = requested_shots(ctx.records), ctx.shots, ctx.held_out
    if not tasks or len(requested) < 2 or "0" not in requested or shots == "0":
        return []
    lines = ["## Shot scaling: the held-out average at every shot count", "",
             "Mean over the held-out tasks and demonstration seeds, with its 95 % interval. "
             f"{shots} − 0: paired on the same queries, with {shots} at the 0-shot cell's seed only (a 0-shot cell has "
             "one), so it can differ from the columns' difference; **bold**: significant after Benjamini-Hochberg over "
             "this column.", "",
             "| method | " + " | ".join(requested) + f" | {shots} − 0 |", "|---|" + "---:|" * (len(requested) + 1)]
    methods = [m for m in ctx.methods if m != REFERENCE]
    gains = [paired_over(ctx.cells, m, m, tasks, shots, "0") for m in methods]
    for m, gain, mark in zip(methods, gains, significance(gains)):
        estimates = [average(ctx.cells, m, tasks, k) for k in requested]
        lines.append(f"| {m} | " + " | ".join(fmt(e) for e in estimates) + f" | {fmt_difference(gain, mark)} |")
    return lines + [""]


def longer_contexts(ctx: ReportContext) -> list[str]:
    """``max@N`` against the headline shot count: does in-context learning keep improving in contexts longer than the
    evaluation budget (set to the training length: longer than anything seen in training)?"""
    shots, tasks, cells = ctx.shots, ctx.held_out, ctx.cells
    longer = sorted({str(r.shots_requested) for r in ctx.records if str(r.shots_requested).startswith("max@")},
                    key=shots_key)
    if not tasks or not longer:
        return []
    budget = next((r.max_tokens for r in ctx.records if str(r.shots_requested) == shots), "?")
    lines = [f"## Past the training length: {shots} shots in {budget} tokens against longer contexts", "",
             "Average over the held-out tasks (mean demonstrations used in brackets); difference = longer − "
             f"{shots}, paired on the same queries and seeds (**bold**: significant after Benjamini-Hochberg over this "
             "table).", "",
             (f"| method | {shots} | " + " | ".join(longer) + " | "
              + " | ".join(f"{k} − {shots}" for k in longer) + " |"),
             "|---|---:|" + "---:|" * (2 * len(longer))]
    methods = [m for m in ctx.methods if m != REFERENCE]
    diffs = {(m, k): paired_over(cells, m, m, tasks, k, shots) for m in methods for k in longer}
    marks = dict(zip(diffs, significance(list(diffs.values()))))
    for m in methods:
        estimates = [average(cells, m, tasks, k) for k in [shots] + longer]
        used = [np.mean([cells[m, t, k].shots for t in tasks if (m, t, k) in cells] or [0]) for k in [shots] + longer]
        text = [f"{fmt(e)} ({u:.0f})" if e else "–" for e, u in zip(estimates, used)]
        text += [fmt_difference(diffs[m, k], marks[m, k]) for k in longer]
        lines.append(f"| {m} | " + " | ".join(text) + " |")
    return lines + [""]


@dataclass(frozen=True)
class VersusBase:
    """A table of every fine-tune against the untuned model on tasks evaluated for one purpose."""

    role: str
    heading: str
    column: str  # what the paired difference is called
    sign: int  # +1: method − base; -1: base − method
    values: str  # the headers of the two value columns


FORGETTING = VersusBase("forgetting", "Forgetting (benchmarks outside the mixture", "drop", -1, "before (base) | after")
IN_DISTRIBUTION = VersusBase("in_distribution", "In distribution (the mixture's own tasks, their test splits", "gain",
                             +1, "base | fine-tuned")


def versus_base(kind: VersusBase) -> Section:
    def section(ctx: ReportContext) -> list[str]:
        tasks = ctx.forgetting if kind.role == "forgetting" else ctx.in_distribution
        if not tasks:
            return []
        shots = headline_shots(ctx.records, kind.role)
        what = "method − base" if kind.sign > 0 else "base − method"
        lines = [f"## {kind.heading}, {shots} shots)", "",
                 f"{kind.column.capitalize()} = {what} on the same queries and seeds (paired interval; **bold** = "
                 "significant after Benjamini-Hochberg over this table).", "",
                 f"| task | method | {kind.values} | {kind.column} |", "|---|---|---:|---:|---:|"]
        entries = [(t, m, ctx.cells[m, t, shots]) for t in tasks for m in ctx.methods
                   if m != UNTUNED and (m, t, shots) in ctx.cells]
        diffs = [paired_over(ctx.cells, *((UNTUNED, m) if kind.sign < 0 else (m, UNTUNED)), [t], shots)
                 for t, m, _ in entries]
        for (t, m, cell), d, mark in zip(entries, diffs, significance(diffs)):
            base = ctx.cells.get((UNTUNED, t, shots))
            lines.append(f"| {t} | {m} | {fmt(base.estimate() if base else None)} | {fmt(cell.estimate())} | "
                         f"{fmt_difference(d, mark)} |")
        return lines + [""]

    return section


def learning_curves(ctx: ReportContext) -> list[str]:
    return curve_sections(ctx.learning_curves)


def budget(ctx: ReportContext) -> list[str]:
    return budget_lines(ctx.budget, ctx.run_config)


def collapsed_cells(ctx: ReportContext) -> list[str]:
    """The cells where one label takes nearly all predictions: first how many per task and method, then each."""
    flagged = [r for r in ctx.records if r.is_collapsed]
    if not flagged:
        return []
    lines = ["## Cells where one label takes ≥ 90 % of the predictions", "",
             "These measure the demonstrations' label mix more than the model: read them with their histograms.", ""]
    # evaluations (one seed of one cell) with one label at >= 90 %, of the task's evaluations
    methods = ctx.methods
    evaluations = Counter((r.task, r.method) for r in ctx.records)
    collapsed = Counter((r.task, r.method) for r in flagged)
    lines += ["| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for t in sorted({r.task for r in flagged}):
        lines.append(f"| {t} | " + " | ".join(f"{collapsed[t, m]} of {evaluations[t, m]}" if evaluations[t, m] else "–"
                                               for m in methods) + " |")
    lines += ["", "| method | task | shots | seed | predictions | golds | demonstrations |",
              "|---|---|---:|---:|---|---|---|"]
    for r in flagged:
        lines.append(f"| {r.method} | {r.task} | {r.shots_requested} | {r.seed} | "
                     f"{r.prediction_counts} | {r.gold_counts} | {r.demo_labels or {}} |")
    return lines + [""]


def training_curves(ctx: ReportContext) -> list[str]:
    """Per fine-tune, its steps and the loss at the start and the end: whether it learned, and had converged."""
    groups = training_groups(ctx.training_logs)
    if not groups:
        return []
    lines = ["## Training curves", "",
             "Loss of each fine-tune (its objective's supervised tokens); start/end = mean over the first/last tenth "
             "of its steps. Tasks learned: on how many of the mixture's tasks with at least 2 steps the loss of the "
             "steps that trained on that task alone fell from the first half of those steps to the second (one task "
             "per step: the tasks differ in loss more than the steps do, so the mean curve alone cannot tell).", "",
             "| fine-tune | steps | loss at start | loss at end | tasks learned |", "|---|---:|---:|---:|---:|"]
    for group, runs in groups.items():
        for name, log in runs.items():
            s = loss_summary(log)
            label = name if group == MIXTURE else f"{REFERENCE}/{name}"
            lines.append(f"| {label} | {s.steps} | {s.start:.3f} | {s.end:.3f} | {s.tasks_learned} |")
    return lines + [""]


SECTIONS: tuple[Section, ...] = (findings, setup, held_out_table, ordering, ordering_without_collapsed,
                                 subject_against_each, gap_closed, shot_scaling, longer_contexts,
                                 versus_base(FORGETTING), versus_base(IN_DISTRIBUTION), learning_curves, budget,
                                 collapsed_cells, training_curves)
