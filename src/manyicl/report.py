"""The report of a compare run, from results.json and the per-query rows in predictions/: every number with its
95 % interval, differences marked only where a paired test on the same queries says so, and the cells where one
label takes nearly all predictions listed (they measure the demonstrations' label mix, not the model).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manyicl.budget_report import budget_sections
from manyicl.curve_report import curve_plot, curve_sections, load_curve_table
from manyicl.errors import ManyICLError
from manyicl.files import read_log, save_figure, write_atomic
from manyicl.methods import METHODS, REFERENCE, SUBJECT, UNTUNED
from manyicl.metrics import METRICS
from manyicl.uncertainty import Estimate, average_interval, interval_of, paired_average, replicates, significant

METHOD_ORDER = list(METHODS)


def _shots_key(k: Any) -> tuple[int, int]:
    """Counts in order, then "max", then "max@N" by N (contexts longer than the evaluation budget)."""
    k = str(k)
    if k.startswith("max@"):
        return (2, int(k[4:]))
    return (1, 0) if k == "max" else (0, int(k))


@dataclass
class Cell:
    """One (method, task, shots) over its seeds: the records and their per-query metric rows, by seed."""

    records: list[dict]
    rows: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def first(self) -> dict:
        return self.records[0]

    @property
    def from_means(self):
        return METRICS[self.first["metric"]].from_means

    @property
    def shots(self) -> int:
        return round(float(np.mean([r["shots"] for r in self.records])))

    def estimate(self) -> Estimate:
        if self.rows:
            return average_interval([list(self.rows.values())], [self.from_means])
        values = [r["value"] for r in self.records]  # records without per-query rows: no interval
        return Estimate(float(np.mean(values)), float("nan"), float("nan"))


def load_cells(run_dir: Path, results: list[dict]) -> dict[tuple, Cell]:
    """(method, task, shots_requested) -> Cell, with each record's per-query rows read from its predictions file."""
    cells: dict[tuple, Cell] = {}
    for r in results:
        cell = cells.setdefault((r["method"], r["task"], str(r["shots_requested"])), Cell([]))
        cell.records.append(r)
        path = run_dir / r["predictions"] if r.get("predictions") else None
        if path is not None and path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            cell.rows[r["seed"]] = np.asarray([json.loads(line)["metric_row"] for line in lines], dtype=float)
    return cells


def _fmt(e: Estimate | None) -> str:
    if e is None:
        return "–"
    return f"{e.value:.3f}" if np.isnan(e.low) else f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def _fmt_difference(c: Any | None, bold: bool = False, p_value: bool = False) -> str:
    """A paired difference with its interval (and p), **bold** when significant; "–" without one."""
    if c is None:
        return "–"
    text = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]" + (f" p={c.p_value:.3f}" if p_value else "")
    return f"**{text}**" if bold else text


def summary_table(results: list[dict], run_dir: str | Path) -> str:
    """The console table: per (method, task, shots), the mean over seeds with its 95 % interval (seeds and queries
    resampled)."""
    lines = [f"{'method':<18} {'task':<22} {'shots':>6} {'used':>5} {'metric':<14} {'value [95% CI]':>24} {'n':>5} "
             f"{'seeds':>5} {'skip':>4} {'s/query':>8}"]
    for (method, task, k), cell in load_cells(Path(run_dir), results).items():
        rs = cell.records
        per_query = sum(r["seconds"] for r in rs) / max(sum(r["n"] for r in rs), 1)
        flag = " ⚠" if any(r.get("collapsed") for r in rs) else ""
        lines.append(f"{method:<18} {task:<22} {k:>6} {cell.shots:>5} {rs[0]['metric']:<14} "
                     f"{_fmt(cell.estimate()):>24} {rs[0]['n']:>5} {len(rs):>5} "
                     f"{sum(r.get('skipped', 0) for r in rs):>4} {per_query:>8.3f}{flag}")
    if any(r.get("collapsed") for r in results):
        lines.append("⚠ one label takes >= 90 % of the predictions in a seed of this cell "
                     "(its histogram is in results.json)")
    return "\n".join(lines)


def _methods(results: list[dict]) -> list[str]:
    present = {r["method"] for r in results}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def headline_shots(results: list[dict], role: str = "held_out") -> str:
    """The largest shot count requested within the evaluation budget (``max`` if it was): where many-shot methods
    are compared. ``max@N`` cells (longer contexts) have their own section."""
    requested = {str(r["shots_requested"]) for r in results if r.get("role", "held_out") == role}
    return max([k for k in requested if "@" not in k] or requested, key=_shots_key)


def _distances(run_dir: Path) -> dict[str, str]:
    """Held-out task -> near/far, from the run's config (tasks.distance); empty when the run did not say."""
    import yaml

    path = run_dir / "compare_config.yaml"
    if not path.exists():
        return {}
    return dict(((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("tasks") or {}).get("distance") or {})


def _averaged_groups(tasks: list[str], distance: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The averages every table reports: all held-out tasks, then near and far where the config labels them."""
    groups = [("average", tasks)]
    for kind in ("near", "far"):
        members = [t for t in tasks if distance.get(t) == kind]
        if members and len(members) < len(tasks):
            groups.append((f"{kind} average", members))
    return groups


def cell_at(cells: dict, method: str, task: str, shots: str) -> Cell | None:
    # task_level is a zero-shot model: its reference value is at 0 shots when it was evaluated there
    if method == REFERENCE and (method, task, "0") in cells:
        return cells[method, task, "0"]
    return cells.get((method, task, shots))


def _paired(a: Cell, b: Cell) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of a and b over the seeds both have, query by query (the same queries and demonstrations)."""
    seeds = sorted(set(a.rows) & set(b.rows))
    if not seeds or any(len(a.rows[s]) != len(b.rows[s]) for s in seeds):
        return None
    return np.concatenate([a.rows[s] for s in seeds]), np.concatenate([b.rows[s] for s in seeds])


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise ManyICLError(f"{run_dir}: no results.json; run manyicl compare or manyicl eval first")
    results = json.loads(path.read_text(encoding="utf-8"))
    if not results:
        raise ManyICLError(f"{path}: holds no results yet")
    cells = load_cells(run_dir, results)
    methods = _methods(results)
    held = sorted({r["task"] for r in results if r.get("role", "held_out") == "held_out"})
    forgetting = sorted({r["task"] for r in results if r.get("role") == "forgetting"})
    in_distribution = sorted({r["task"] for r in results if r.get("role") == "in_distribution"})
    shots = headline_shots(results) if held else "0"
    distance = _distances(run_dir)
    groups = _averaged_groups(held, distance)
    comparisons = paired_comparisons(cells, methods, held, shots, groups) if held else []
    gaps = gap_closed(cells, held, shots, groups) if held else []
    lines = [f"# ManyICL comparison: {run_dir.name}", ""]
    lines += _findings(cells, methods, held, shots, comparisons, groups, gaps)
    lines += _setup_lines(run_dir, results, methods)
    if held:
        lines += _main_table(cells, methods, held, shots, distance)
        lines += _ordering(cells, methods, held, shots)
        lines += _comparisons(comparisons, methods, held, shots, groups)
        lines += _gap_closed(gaps)
        lines += _shot_scaling(cells, methods, held, results, shots)
        lines += _longer_contexts(cells, methods, held, results, shots)
    if forgetting:
        lines += _versus_base_table(cells, methods, forgetting, headline_shots(results, "forgetting"), FORGETTING)
    if in_distribution:
        lines += _versus_base_table(cells, methods, in_distribution, headline_shots(results, "in_distribution"),
                                    IN_DISTRIBUTION)
    learning_curves = load_curve_table(run_dir)
    lines += curve_sections(learning_curves)
    budget_lines, budget_plots = budget_sections(run_dir, cells, methods, held, budget_shots(run_dir, shots),
                                                 _final_step(run_dir))
    lines += budget_lines
    lines += _flagged(results)
    curves = _training_curves(run_dir)
    lines += curves[0]
    plots = (_plots(run_dir, cells, methods, held, shots) + curve_plot(run_dir, learning_curves) + budget_plots
             + curves[1])
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in plots] + [""]
    lines += ["All records: [results.json](results.json); predictions and per-query rows per cell under "
              "`predictions/`.", ""]
    report = run_dir / "report.md"
    write_atomic(report, "\n".join(lines))
    return report


def method_summaries(run_dir: Path) -> dict[str, list[str]]:
    """Per method, the markdown a model card shows: the held-out tasks at the headline shot count with 95 %
    intervals, and their average, from the run's results.json."""
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    held = sorted({r["task"] for r in results if r.get("role", "held_out") == "held_out"})
    if not held:
        return {}
    cells, shots = load_cells(run_dir, results), headline_shots(results)
    summaries = {}
    for m in _methods(results):
        rows = [(t, cell_at(cells, m, t, shots)) for t in held]
        lines = [f"Held-out tasks (never trained on) at {shots} shots, from `manyicl compare` ({run_dir.name}); "
                 "mean over demonstration seeds with its 95 % interval:", "", "| task | metric | value |",
                 "|---|---|---:|"]
        lines += [f"| {t} | {c.first['metric']} | {_fmt(c.estimate())} |" for t, c in rows if c]
        lines += [f"| **average** | | **{_fmt(_average(cells, m, held, shots))}** |"]
        summaries[m] = lines
    return summaries


def _run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "compare_config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


def budget_shots(run_dir: Path, default: str) -> str:
    """The shot count the earlier budget points were evaluated at (the first of compare.budget_shots)."""
    shots = (_run_config(run_dir).get("compare") or {}).get("budget_shots") or [default]
    return str(shots[0])


def _final_step(run_dir: Path) -> int | None:
    """The steps of the mixture fine-tunes (the final budget point), from their train summaries."""
    for summary in sorted((run_dir / "train").glob("*/train_summary.json")):
        return json.loads(summary.read_text())["steps"]
    return None


def _setup_lines(run_dir: Path, results: list[dict], methods: list[str]) -> list[str]:
    queries = sorted({r["n"] for r in results})
    skipped = sum(r.get("skipped", 0) for r in results)
    lines = [f"Model: `{results[0]['model']}`. Demonstration seeds: {sorted({r['seed'] for r in results})}. "
             f"Queries per cell: {', '.join(map(str, queries))}. "
             f"Context budget at evaluation: {results[0].get('max_tokens')} tokens. "
             "Label candidates ranked by: "
             f"{', '.join(sorted({r['scoring'] for r in results if r.get('scoring')})) or '–'}. "
             f"Queries too long for the context (scored as wrong, kept in every denominator): {skipped}.", "",
             "Every value is the mean over demonstration seeds with its 95 % interval [low, high] (bootstrap over "
             "seeds and queries). ⚠ marks a cell where one label took ≥ 90 % of the predictions in some seed.", ""]
    if max(queries) < 200 or len({r["seed"] for r in results}) < 3:
        lines += ["This run uses fewer queries or demonstration seeds than the defaults (200 queries, 3 seeds) where "
                  "its test splits have more: its intervals are wider than a full run's.", ""]
    rows = []
    for m in methods:
        mixture = run_dir / "train" / m / "mixture.json"
        summary = run_dir / "train" / m / "train_summary.json"
        if mixture.exists() and summary.exists():
            counts = json.loads(mixture.read_text())
            s = json.loads(summary.read_text())
            never = [t for t, c in counts.items() if not c["sequences"]]
            trained = (f"{len(counts) - len(never)} of {len(counts)}"
                       + (f" (none of {', '.join(never)})" if never else ""))
            rows.append(f"| {m} | {s['steps']} | {sum(c['sequences'] for c in counts.values())} | {trained} | "
                        f"{sum(c['answers'] for c in counts.values())} | {s['seconds']:.0f} |")
    if rows:
        lines += ["Training budget (identical steps, sequence length and batch for every fine-tuned method; "
                  "mixture tasks drawn: how many of the listed tasks got at least one sequence):", "",
                  "| method | steps | sequences | mixture tasks drawn | supervised answers seen | train seconds |",
                  "|---|---:|---:|---|---:|---:|", *rows, ""]
    return lines


def _main_table(cells: dict, methods: list[str], tasks: list[str], shots: str, distance: dict[str, str]) -> list[str]:
    lines = [f"## Held-out tasks at {shots} shots", "",
             "Primary metric (task_level: its 0-shot value, the dedicated-model reference)."
             + (" near: a task of the same kind is in the mixture; far: none is." if distance else ""), "",
             "| task | family | metric | " + " | ".join(methods) + " |", "|---|---|---|" + "---:|" * len(methods)]
    by_family: dict[str, list[str]] = {}
    for t in tasks:
        row = [cell_at(cells, m, t, shots) for m in methods]
        first = next(c for c in row if c).first
        by_family.setdefault(first["family"], []).append(t)
        kind = f" ({distance[t]})" if t in distance else ""
        lines.append(f"| {t}{kind} | {first['family']} | {first['metric']} | " + " | ".join(
            _fmt(c.estimate()) + (" ⚠" if any(r.get("collapsed") for r in c.records) else "") if c else "–"
            for c in row) + " |")
    groups = sorted(by_family.items())
    if len(by_family) > 1:
        groups += [(name.replace("average", "held-out"), members)
                   for name, members in _averaged_groups(tasks, distance)]
    for name, members in groups:
        lines.append(f"| **{name} average** | | | " + " | ".join(f"**{_fmt(_average(cells, m, members, shots))}**"
                                                               for m in methods) + " |")
    return lines + [""]


def _average(cells: dict, method: str, tasks: list[str], shots: str) -> Estimate | None:
    """The mean over tasks of the seed-mean, resampling seeds and queries; None unless every task has rows."""
    members = [cell_at(cells, method, t, shots) for t in tasks]
    if any(c is None or not c.rows for c in members):
        return None
    return average_interval([list(c.rows.values()) for c in members], [c.from_means for c in members])


def _paired_over(cells: dict, a: str, b: str, tasks: list[str], shots: str, b_shots: str | None = None) -> Any | None:
    """a − b (b at ``b_shots`` if given) on the average over tasks, paired bootstrap on the same queries and seeds;
    None unless every task has both cells."""
    pairs, fns = [], []
    for t in tasks:
        ca, cb = cell_at(cells, a, t, shots), cell_at(cells, b, t, b_shots or shots)
        paired = _paired(ca, cb) if ca and cb else None
        if paired is None:
            return None
        pairs.append(paired)
        fns.append(ca.from_means)
    return paired_average(pairs, fns)


def paired_comparisons(cells: dict, methods: list[str], tasks: list[str], shots: str,
                       groups: list[tuple[str, list[str]]] | None = None) -> list[tuple[str, str, Any, bool]]:
    """manyicl − every other method, per task and on the averages (all held-out tasks, and near/far where labelled),
    on the same queries and seeds: (method, task or group name, Comparison, significant after Benjamini-Hochberg
    over all of them)."""
    if SUBJECT not in methods:
        return []
    table: list[tuple[str, str, Any]] = []
    for m in (m for m in methods if m != SUBJECT):
        for t in tasks:
            c = _paired_over(cells, SUBJECT, m, [t], shots)
            if c is not None:
                table.append((m, t, c))
        for name, members in groups or [("average", tasks)]:
            c = _paired_over(cells, SUBJECT, m, members, shots) if len(tasks) > 1 else None
            if c is not None:
                table.append((m, name, c))
    marks = significant([c.p_value for _, _, c in table])
    return [(m, t, c, mark) for (m, t, c), mark in zip(table, marks)]


def _ordering(cells: dict, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    """Every method by its held-out average, and every pair's paired difference (Benjamini-Hochberg over the pairs):
    which steps of the ordering the data actually resolve."""
    if len(tasks) < 2:
        return []
    averages = {m: _average(cells, m, tasks, shots) for m in methods}
    ranked = sorted((m for m in methods if averages[m]), key=lambda m: -averages[m].value)
    pairs = [(a, b, _paired_over(cells, a, b, tasks, shots)) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    pairs = [(a, b, c) for a, b, c in pairs if c is not None]
    if len(ranked) < 2 or not pairs:
        return []
    marks = dict(zip([(a, b) for a, b, _ in pairs], significant([c.p_value for *_, c in pairs])))
    chain = ranked[0]
    for a, b in zip(ranked, ranked[1:]):
        chain += (" > " if marks.get((a, b)) else " ≈ ") + b
    lines = [f"## Method ordering (average over the {len(tasks)} held-out tasks, {shots} shots)", "",
             f"{chain}   (> : the neighbours differ significantly; ≈ : they cannot be told apart here)", "",
             "Every pair, higher-ranked − lower-ranked, paired on the same queries and seeds (95 % interval, p; "
             "**bold** = significant after Benjamini-Hochberg over these pairs):", "",
             "| method | average | " + " | ".join(ranked[1:]) + " |", "|---|---:|" + "---:|" * (len(ranked) - 1)]
    found = {(a, b): c for a, b, c in pairs}
    for a in ranked:
        row = []
        for b in ranked[1:]:
            c = found.get((a, b))
            row.append(_fmt_difference(c, marks[(a, b)], p_value=True) if c else "")
        lines.append(f"| {a} | {_fmt(averages[a])} | " + " | ".join(row) + " |")
    return lines + [""]


def _shot_scaling(cells: dict, methods: list[str], tasks: list[str], results: list[dict], shots: str) -> list[str]:
    """The held-out average at every shot count, and what the headline shot count adds over none: the shot-scaling
    plot in numbers, so the methods' gains from demonstrations can be compared with intervals."""
    requested = sorted({str(r["shots_requested"]) for r in results if r.get("role", "held_out") == "held_out"},
                       key=_shots_key)
    if len(requested) < 2 or "0" not in requested or shots == "0":
        return []
    lines = ["## Shot scaling: the held-out average at every shot count", "",
             "Mean over the held-out tasks and demonstration seeds, with its 95 % interval. "
             f"{shots} − 0: paired on the same queries, with {shots} at the 0-shot cell's seed only (a 0-shot cell has "
             "one), so it can differ from the columns' difference; **bold**: significant after Benjamini-Hochberg over "
             "this column.", "",
             "| method | " + " | ".join(requested) + f" | {shots} − 0 |", "|---|" + "---:|" * (len(requested) + 1)]
    rows = [(m, [_average(cells, m, tasks, k) for k in requested], _paired_over(cells, m, m, tasks, shots, "0"))
            for m in methods if m != REFERENCE]
    marks = iter(significant([d.p_value for *_, d in rows if d is not None]))
    for m, estimates, d in rows:
        diff = _fmt_difference(d, d is not None and next(marks))
        lines.append(f"| {m} | " + " | ".join(_fmt(e) for e in estimates) + f" | {diff} |")
    return lines + [""]


def _longer_contexts(cells: dict, methods: list[str], tasks: list[str], results: list[dict], shots: str) -> list[str]:
    """``max@N`` against the headline shot count: does in-context learning keep improving in contexts longer than the
    evaluation budget (set to the training length: longer than anything seen in training)?"""
    longer = sorted({str(r["shots_requested"]) for r in results if str(r["shots_requested"]).startswith("max@")},
                    key=_shots_key)
    if not longer:
        return []
    budget = next((r["max_tokens"] for r in results if str(r["shots_requested"]) == shots), "?")
    lines = [f"## Past the training length: {shots} shots in {budget} tokens against longer contexts", "",
             "Average over the held-out tasks (mean demonstrations used in brackets); difference = longer − "
             f"{shots}, paired on the same queries and seeds (**bold**: significant after Benjamini-Hochberg over this "
             "table).", "",
             (f"| method | {shots} | " + " | ".join(longer) + " | "
              + " | ".join(f"{k} − {shots}" for k in longer) + " |"),
             "|---|---:|" + "---:|" * (2 * len(longer))]
    rows = []
    for m in (m for m in methods if m != REFERENCE):
        estimates = [_average(cells, m, tasks, k) for k in [shots] + longer]
        used = [np.mean([cells[m, t, k].shots for t in tasks if (m, t, k) in cells] or [0]) for k in [shots] + longer]
        rows.append((m, estimates, used, [_paired_over(cells, m, m, tasks, k, shots) for k in longer]))
    marks = iter(significant([d.p_value for *_, ds in rows for d in ds if d is not None]))
    for m, estimates, used, diffs in rows:
        text = [f"{_fmt(e)} ({u:.0f})" if e else "–" for e, u in zip(estimates, used)]
        for d in diffs:
            text.append(_fmt_difference(d, d is not None and next(marks)))
        lines.append(f"| {m} | " + " | ".join(text) + " |")
    return lines + [""]


def _findings(cells: dict, methods: list[str], tasks: list[str], shots: str, comparisons: list,
              groups: list[tuple[str, list[str]]] = (), gaps: list[tuple] = ()) -> list[str]:
    """What the run found, in two sentences: ManyICL's held-out average, which methods it beats, trails or cannot
    be told from (paired tests), and how much of the gap to the dedicated fine-tune it closes."""
    if SUBJECT not in methods or not tasks:
        return []
    average = _average(cells, SUBJECT, tasks, shots)
    scope = "average" if len(tasks) > 1 else tasks[0]
    verdicts: dict[str, list[str]] = {"better than": [], "worse than": [], "not distinguishable from": []}
    for m, t, c, mark in comparisons:
        if t == scope:
            kind = "not distinguishable from" if not mark else ("better than" if c.difference > 0 else "worse than")
            verdicts[kind].append(f"{m} ({c.difference:+.3f})")
    said = "; ".join(f"{kind} {', '.join(ms)}" for kind, ms in verdicts.items() if ms)
    group_averages = [(name, members, _average(cells, SUBJECT, members, shots)) for name, members in groups
                      if name != "average"]  # one bootstrap per group
    parts = [f"{len(members)} {name.split()[0]}: {_fmt(e)}" for name, members, e in group_averages if e]
    first = (f"On {len(tasks)} held-out task{'s' if len(tasks) > 1 else ''} at {shots} shots ManyICL scores "
             f"{_fmt(average) if average else '–'} on average{' (' + '; '.join(parts) + ')' if parts else ''}: "
             f"{said or 'no other method to compare with'} (paired tests on the same queries, Benjamini-Hochberg).")
    # the gap on the average over the held-out tasks (the first group row), or on the one task
    overall = next((row for row in gaps if row[0] == "average" and row[3]), gaps[0] if len(gaps) == 1 else None)
    second = (f"Against a dedicated fine-tune per task it closes {overall[2]} of the gap from the untuned model on "
              f"{'the held-out average' if len(tasks) > 1 else tasks[0]} (per task and per group below)."
              if overall else "No task has a dedicated fine-tune (task_level) here, so no gap-closed figure is given.")
    return ["## What this run found", "", first + " " + second, ""]


def _comparisons(comparisons: list, methods: list[str], tasks: list[str], shots: str,
                 groups: list[tuple[str, list[str]]]) -> list[str]:
    if not comparisons:
        return []
    names = [name for name, _ in groups]
    lines = [f"## ManyICL against each method ({shots} shots, paired on the same queries and seeds)", "",
             "Difference manyicl − method with its 95 % paired-bootstrap interval; **bold** = significant after "
             "Benjamini-Hochberg over this table (q < 0.05); otherwise the two are not distinguishable here.", "",
             "| method | " + " | ".join(tasks + names) + " |", "|---|" + "---:|" * (len(tasks) + len(names))]
    for m in (m for m in methods if m != SUBJECT):
        row = []
        for t in tasks + names:
            hit = [(c, mark) for mm, tt, c, mark in comparisons if mm == m and tt == t]
            if not hit:
                row.append("–")
                continue
            c, mark = hit[0]
            row.append(_fmt_difference(c, mark))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines + [""]


def _gap_draws(cells: dict, task: str, shots: str, rng: np.random.Generator
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


def _gap_text(values: np.ndarray, draws: np.ndarray | None) -> str:
    """(manyicl − base) / (task_level − base) with the interval of its bootstrap replicates (columns: base,
    manyicl, task_level)."""
    denominator = values[2] - values[0]
    if denominator <= 0:
        return "n/a (task_level ≤ base)"
    gap = f"{(values[1] - values[0]) / denominator:.2f}"
    if draws is None:
        return gap
    ratios = (draws[:, 1] - draws[:, 0]) / (draws[:, 2] - draws[:, 0])
    low, high = interval_of(ratios[np.isfinite(ratios)])
    return f"{gap} [{low:.2f}, {high:.2f}]"


def gap_closed(cells: dict, tasks: list[str], shots: str, groups: list[tuple[str, list[str]]] = ()) -> list[tuple]:
    """(name, [base, manyicl, task_level estimates], gap text, tasks averaged) per task (tasks averaged: None), then
    per group of tasks (the averages: the gap on the group's average score, every task's queries resampled alike for
    the three models)."""
    rng = np.random.default_rng(0)
    per_task = {t: found for t in tasks if (found := _gap_draws(cells, t, shots, rng)) is not None}
    rows = [(t, estimates, _gap_text(np.array([e.value for e in estimates]), draws), None)
            for t, (estimates, draws) in per_task.items()]
    for name, members in groups:
        members = [t for t in members if t in per_task]
        draws = [per_task[t][1] for t in members]
        if len(members) < 2 or any(d is None for d in draws):
            continue
        values = np.mean([[e.value for e in per_task[t][0]] for t in members], axis=0)
        mean_draws = np.mean(draws, axis=0)
        estimates = [Estimate(values[i], *interval_of(mean_draws[:, i])) for i in range(3)]
        rows.append((name, estimates, _gap_text(values, mean_draws), len(members)))
    return rows


def _gap_closed(rows: list[tuple]) -> list[str]:
    if not rows:
        return []
    lines = ["## Gap closed by ManyICL", "",
             "(manyicl − base) / (task_level − base), at the headline shot count, with a 95 % interval (the same "
             "queries resampled for the three models; task_level is its 0-shot value). The averages take the gap on "
             "the average score of their tasks, so a task where task_level is below base counts there too. Here the "
             "demonstration seeds are held fixed and only queries are resampled, so the averages' intervals are "
             "narrower than the held-out table's (which also resamples seeds).", "",
             "| task | base | manyicl | task_level | gap closed |", "|---|---:|---:|---:|---:|"]
    for name, estimates, gap, averaged in rows:
        label = name if averaged is None else f"**{name}** ({averaged} tasks)"
        lines.append(f"| {label} | " + " | ".join(_fmt(e) for e in estimates) + f" | {gap} |")
    return lines + [""]


@dataclass(frozen=True)
class VersusBase:
    """A table of every fine-tune against the untuned model on tasks evaluated for one purpose."""

    heading: str
    column: str  # what the paired difference is called
    sign: int  # +1: method − base; -1: base − method
    values: str  # the headers of the two value columns


FORGETTING = VersusBase("Forgetting (benchmarks outside the mixture", "drop", -1, "before (base) | after")
IN_DISTRIBUTION = VersusBase("In distribution (the mixture's own tasks, their test splits", "gain", +1,
                             "base | fine-tuned")


def _versus_base_table(cells: dict, methods: list[str], tasks: list[str], shots: str, kind: VersusBase) -> list[str]:
    what = "method − base" if kind.sign > 0 else "base − method"
    lines = [f"## {kind.heading}, {shots} shots)", "",
             f"{kind.column.capitalize()} = {what} on the same queries and seeds (paired interval; **bold** = "
             "significant after Benjamini-Hochberg over this table).", "",
             f"| task | method | {kind.values} | {kind.column} |", "|---|---|---:|---:|---:|"]
    entries = []
    for t in tasks:
        base = cells.get((UNTUNED, t, shots))
        for m in methods:
            cell = cells.get((m, t, shots))
            if m == UNTUNED or cell is None:
                continue
            entries.append((t, m, base, cell, _paired_over(cells, *((UNTUNED, m) if kind.sign < 0 else (m, UNTUNED)),
                                                            [t], shots)))
    marks = iter(significant([d.p_value for *_, d in entries if d is not None]))
    for t, m, base, cell, drop in entries:
        text = _fmt_difference(drop, drop is not None and next(marks))
        lines.append(f"| {t} | {m} | {_fmt(base.estimate() if base else None)} | {_fmt(cell.estimate())} | {text} |")
    return lines + [""]


def _tasks_learned(log: list[dict]) -> str:
    """"k of n": tasks whose single-task steps have a lower mean loss in their second half than in their first."""
    by_task: dict[str, list[float]] = {}
    for r in log:
        if len(r.get("tasks") or []) == 1:
            by_task.setdefault(r["tasks"][0], []).append(r["loss"])
    halves = [(np.mean(v[: len(v) // 2]), np.mean(v[len(v) // 2:])) for v in by_task.values() if len(v) >= 2]
    return f"{sum(b < a for a, b in halves)} of {len(halves)}" if halves else "–"


def _training_curves(run_dir: Path) -> tuple[list[str], list[Path]]:
    """Every fine-tune's loss by step (plot) and, per run, its steps and the loss at the start and the end (mean of
    the first and the last tenth of the steps): whether a fine-tune learned, and whether it had converged."""
    logs = {p.parent.relative_to(run_dir / "train").as_posix(): read_log(p)
            for p in sorted((run_dir / "train").glob("**/train_log.jsonl"))}
    logs = {name: log for name, log in logs.items() if log}
    if not logs:
        return [], []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["## Training curves", "",
             "Loss of each fine-tune (its objective's supervised tokens); start/end = mean over the first/last tenth "
             "of its steps. Tasks learned: on how many of the mixture's tasks with at least 2 steps the loss of the "
             "steps that trained on that task alone fell from the first half of those steps to the second (one task "
             "per step: the tasks differ in loss more than the steps do, so the mean curve alone cannot tell).", "",
             "| fine-tune | steps | loss at start | loss at end | tasks learned |", "|---|---:|---:|---:|---:|"]
    groups = {"mixture": {n: g for n, g in logs.items() if not n.startswith(f"{REFERENCE}/")},
              REFERENCE: {n.split("/", 1)[1]: g for n, g in logs.items() if n.startswith(f"{REFERENCE}/")}}
    groups = {k: v for k, v in groups.items() if v}
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    for ax, (group, runs) in zip(axes.flat, groups.items()):
        for name, log in runs.items():
            steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
            tenth = max(1, len(losses) // 10)
            label = name if group == "mixture" else f"task_level/{name}"
            lines.append(f"| {label} | {steps[-1]} | {np.mean(losses[:tenth]):.3f} | {np.mean(losses[-tenth:]):.3f} | "
                         f"{_tasks_learned(log)} |")
            window = max(1, len(losses) // 20)  # a running mean: one step's loss depends on its sequence
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, label=name)
        ax.set_title("mixture fine-tunes" if group == "mixture" else "task_level (one per held-out task)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (running mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    path = plot_dir / "training_curves.png"
    save_figure(fig, path)
    plt.close(fig)
    return lines + [""], [path]


def _flagged(results: list[dict]) -> list[str]:
    flagged = [r for r in results if r.get("collapsed")]
    if not flagged:
        return []
    lines = ["## Cells where one label takes ≥ 90 % of the predictions", "",
             "These measure the demonstrations' label mix more than the model: read them with their histograms.", ""]
    # first how many: evaluations (one seed of one cell) with one label at >= 90 %, of the task's evaluations
    methods = _methods(results)
    evaluations = Counter((r["task"], r["method"]) for r in results)
    collapsed = Counter((r["task"], r["method"]) for r in flagged)
    lines += ["| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for t in sorted({r["task"] for r in flagged}):
        lines.append(f"| {t} | " + " | ".join(f"{collapsed[t, m]} of {evaluations[t, m]}" if evaluations[t, m] else "–"
                                               for m in methods) + " |")
    lines += ["", "| method | task | shots | seed | predictions | golds | demonstrations |",
              "|---|---|---:|---:|---|---|---|"]
    for r in flagged:
        lines.append(f"| {r['method']} | {r['task']} | {r['shots_requested']} | {r['seed']} | "
                     f"{r['prediction_counts']} | {r['gold_counts']} | {r.get('demo_labels', {})} |")
    return lines + [""]


def _plots(run_dir: Path, cells: dict, methods: list[str], tasks: list[str], shots: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        return []
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    # metric vs shots, one panel per task, one line per method with its 95 % band (the paper's shot-scaling figure)
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    # one colour per method in every panel, and one legend for the figure: a panel may lack a method (a partial run)
    colours = {m: f"C{i}" for i, m in enumerate(m for m in methods if m != REFERENCE)} | {REFERENCE: "red"}
    handles = {}
    for ax, t in zip(axes.flat, tasks):
        first = next(c for (_, tt, _), c in cells.items() if tt == t).first
        for m in methods:
            if m == REFERENCE and (m, t, "0") in cells:
                e = cells[m, t, "0"].estimate()
                handles[m] = ax.axhline(e.value, color=colours[m], linestyle=":", label=m)
                if not np.isnan(e.low):
                    ax.axhspan(e.low, e.high, color=colours[m], alpha=0.08)
                continue
            # by shots used; two requests may use the same number (32 and max when only 26 fit): both are drawn
            ordered = sorted(((c.shots, _shots_key(k)), c) for (mm, tt, k), c in cells.items() if mm == m and tt == t)
            points = [(c.shots, c.estimate()) for _, c in ordered]
            if not points:
                continue
            xs = [max(x, 0.5) for x, _ in points]
            handles[m], = ax.plot(xs, [e.value for _, e in points], marker="o", color=colours[m], label=m)
            ax.fill_between(xs, [e.low for _, e in points], [e.high for _, e in points], color=colours[m], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{t} ({first['family']})")
        ax.set_xlabel("demonstrations in context (0 plotted at 0.5)")
        ax.set_ylabel(first["metric"])
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
               loc="lower center", ncol=max(1, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the legend below the panels
    scaling = plot_dir / "shot_scaling.png"
    save_figure(fig, scaling)
    plt.close(fig)

    # methods by family at the headline shot count, with 95 % intervals
    families: dict[str, list[str]] = {}
    for t in tasks:
        families.setdefault(next(c for (_, tt, _), c in cells.items() if tt == t).first["family"], []).append(t)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families) + 2), 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        estimates = [_average(cells, m, members, shots) for members in families.values()]
        heights = [e.value if e else np.nan for e in estimates]  # no bar where a method lacks a task of the family
        errors = [[e.value - e.low if e else 0.0 for e in estimates],
                  [e.high - e.value if e else 0.0 for e in estimates]]
        ax.bar([j + i * width for j in range(len(families))], heights, width, yerr=errors, capsize=2, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], list(families))
    ax.set_ylabel("mean primary metric (95 % interval)")
    ax.set_title(f"Held-out tasks by family at {shots} shots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bars = plot_dir / "methods_by_family.png"
    save_figure(fig, bars)
    plt.close(fig)
    return [scaling, bars]
