"""The report of a compare run, from results.json and the per-query rows in predictions/: every number with its
95 % interval, differences marked only where a paired test on the same queries says so, and the cells where one
label takes nearly all predictions listed (they measure the demonstrations' label mix, not the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manyicl.errors import ManyICLError
from manyicl.methods import METHODS
from manyicl.metrics import METRICS
from manyicl.uncertainty import Estimate, average_interval, interval_of, paired_average, replicates, significant

METHOD_ORDER = list(METHODS)


def _shots_key(k: Any) -> float:
    return float("inf") if k == "max" else float(k)


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


def summary_table(results: list[dict], run_dir: str | Path) -> str:
    """The console table: per (method, task, shots), the mean over seeds with its 95 % interval (seeds and queries
    resampled)."""
    lines = [f"{'method':<18} {'task':<22} {'shots':>6} {'used':>5} {'metric':<14} {'value [95% CI]':>24} {'n':>5} "
             f"{'seeds':>5} {'skip':>4} {'s/query':>8}"]
    for (method, task, k), cell in load_cells(Path(run_dir), results).items():
        rs = cell.records
        per_query = sum(r["seconds"] for r in rs) / max(sum(r["n"] for r in rs), 1)
        flag = " ⚠" if any(r.get("collapsed") for r in rs) else ""
        lines.append(f"{method:<18} {task:<22} {k:>6} {cell.shots:>5} {rs[0]['metric']:<14} {_fmt(cell.estimate()):>24} "
                     f"{rs[0]['n']:>5} {len(rs):>5} {sum(r.get('skipped', 0) for r in rs):>4} {per_query:>8.3f}{flag}")
    if any(r.get("collapsed") for r in results):
        lines.append("⚠ one label takes >= 90 % of the predictions in a seed of this cell (its histogram is in results.json)")
    return "\n".join(lines)


def _methods(results: list[dict]) -> list[str]:
    present = {r["method"] for r in results}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def headline_shots(results: list[dict], role: str = "held_out") -> str:
    """The largest shot count requested (``max`` if it was): where many-shot methods are compared."""
    return str(max({r["shots_requested"] for r in results if r.get("role", "held_out") == role}, key=_shots_key))


def cell_at(cells: dict, method: str, task: str, shots: str) -> Cell | None:
    # task_level is a zero-shot model: its reference value is at 0 shots when it was evaluated there
    if method == "task_level" and (method, task, "0") in cells:
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
    shots = headline_shots(results) if held else "0"
    comparisons = paired_comparisons(cells, methods, held, shots) if held else []
    lines = [f"# ManyICL comparison: {run_dir.name}", ""]
    lines += _findings(cells, methods, held, shots, comparisons)
    lines += _setup_lines(run_dir, results, methods)
    if held:
        lines += _main_table(cells, methods, held, shots)
        lines += _comparisons(comparisons, methods, held, shots)
        lines += _gap_closed(cells, held, shots)
    if forgetting:
        lines += _forgetting_table(cells, methods, forgetting, headline_shots(results, "forgetting"))
    lines += _flagged(results)
    plots = _plots(run_dir, cells, methods, held, shots)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in plots] + [""]
    lines += ["All records: [results.json](results.json); predictions and per-query rows per cell under `predictions/`.", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _setup_lines(run_dir: Path, results: list[dict], methods: list[str]) -> list[str]:
    queries = sorted({r["n"] for r in results})
    skipped = sum(r.get("skipped", 0) for r in results)
    lines = [f"Model: `{results[0]['model']}`. Demonstration seeds: {sorted({r['seed'] for r in results})}. Queries per "
             f"cell: {', '.join(map(str, queries))}. Context budget at evaluation: {results[0].get('max_tokens')} tokens. "
             f"Label candidates ranked by: {', '.join(sorted({r['scoring'] for r in results if r.get('scoring')})) or '–'}. "
             f"Queries too long for the context (scored as wrong, kept in every denominator): {skipped}.", "",
             "Every value is the mean over demonstration seeds with its 95 % interval [low, high] (bootstrap over seeds "
             "and queries). ⚠ marks a cell where one label took ≥ 90 % of the predictions in some seed.", ""]
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
            rows.append(f"| {m} | {s['steps']} | {sum(c['sequences'] for c in counts.values())} | "
                        f"{sum(c['answers'] for c in counts.values())} | {s['seconds']:.0f} |")
    if rows:
        lines += ["Training budget (identical steps, sequence length and batch for every fine-tuned method):", "",
                  "| method | steps | sequences | supervised answers seen | train seconds |", "|---|---:|---:|---:|---:|",
                  *rows, ""]
    return lines


def _main_table(cells: dict, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    lines = [f"## Held-out tasks at {shots} shots", "",
             "Primary metric (task_level: its 0-shot value, the dedicated-model reference).", "",
             "| task | family | metric | " + " | ".join(methods) + " |", "|---|---|---|" + "---:|" * len(methods)]
    by_family: dict[str, list[str]] = {}
    for t in tasks:
        row = [cell_at(cells, m, t, shots) for m in methods]
        first = next(c for c in row if c).first
        by_family.setdefault(first["family"], []).append(t)
        lines.append(f"| {t} | {first['family']} | {first['metric']} | " + " | ".join(
            _fmt(c.estimate()) + (" ⚠" if any(r.get("collapsed") for r in c.records) else "") if c else "–"
            for c in row) + " |")
    groups = sorted(by_family.items()) + ([("all held-out", tasks)] if len(by_family) > 1 else [])
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


def paired_comparisons(cells: dict, methods: list[str], tasks: list[str], shots: str) -> list[tuple[str, str, Any, bool]]:
    """manyicl − every other method, per task and on the average over tasks, on the same queries and seeds:
    (method, task or "average", Comparison, significant after Benjamini-Hochberg over all of them)."""
    if "manyicl" not in methods:
        return []
    table: list[tuple[str, str, Any]] = []
    for m in (m for m in methods if m != "manyicl"):
        pairs, fns = [], []
        for t in tasks:
            a, b = cell_at(cells, "manyicl", t, shots), cell_at(cells, m, t, shots)
            paired = _paired(a, b) if a and b else None
            if paired is not None:
                pairs.append(paired)
                fns.append(a.from_means)
                table.append((m, t, paired_average([paired], [a.from_means])))
        if len(pairs) > 1:
            table.append((m, "average", paired_average(pairs, fns)))
    marks = significant([c.p_value for _, _, c in table])
    return [(m, t, c, mark) for (m, t, c), mark in zip(table, marks)]


def _findings(cells: dict, methods: list[str], tasks: list[str], shots: str, comparisons: list) -> list[str]:
    """What the run found, in two sentences: ManyICL's held-out average, which methods it beats, trails or cannot
    be told from (paired tests), and how much of the gap to the dedicated fine-tune it closes."""
    if "manyicl" not in methods or not tasks:
        return []
    average = _average(cells, "manyicl", tasks, shots)
    scope = "average" if len(tasks) > 1 else tasks[0]
    verdicts: dict[str, list[str]] = {"better than": [], "worse than": [], "not distinguishable from": []}
    for m, t, c, mark in comparisons:
        if t == scope:
            kind = "not distinguishable from" if not mark else ("better than" if c.difference > 0 else "worse than")
            verdicts[kind].append(f"{m} ({c.difference:+.3f})")
    said = "; ".join(f"{kind} {', '.join(ms)}" for kind, ms in verdicts.items() if ms)
    first = (f"On {len(tasks)} held-out task{'s' if len(tasks) > 1 else ''} at {shots} shots ManyICL scores "
             f"{_fmt(average) if average else '–'} on average: {said or 'no other method to compare with'} "
             f"(paired tests on the same queries, Benjamini-Hochberg).")
    gaps = []
    for t in tasks:
        b, mi, tl = (cell_at(cells, x, t, shots) for x in ("base", "manyicl", "task_level"))
        if b and mi and tl and tl.estimate().value > b.estimate().value:
            gaps.append((mi.estimate().value - b.estimate().value) / (tl.estimate().value - b.estimate().value))
    second = (f"Against a dedicated fine-tune per task it closes a median {np.median(gaps):.2f} of the gap from the "
              f"untuned model ({len(gaps)} of {len(tasks)} tasks where the dedicated model beats it; per task with "
              f"intervals below)." if gaps else
              "No task has a dedicated fine-tune above the untuned model here, so no gap-closed figure is given.")
    return ["## What this run found", "", first + " " + second, ""]


def _comparisons(comparisons: list, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    if not comparisons:
        return []
    lines = [f"## ManyICL against each method ({shots} shots, paired on the same queries and seeds)", "",
             "Difference manyicl − method with its 95 % paired-bootstrap interval; **bold** = significant after "
             "Benjamini-Hochberg over this table (q < 0.05); otherwise the two are not distinguishable here.", "",
             "| method | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    for m in (m for m in methods if m != "manyicl"):
        row = []
        for t in tasks + ["average"]:
            hit = [(c, mark) for mm, tt, c, mark in comparisons if mm == m and tt == t]
            if not hit:
                row.append("–")
                continue
            c, mark = hit[0]
            text = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
            row.append(f"**{text}**" if mark else text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines + [""]


def _gap_closed(cells: dict, tasks: list[str], shots: str) -> list[str]:
    lines = ["## Gap closed by ManyICL", "",
             "(manyicl − base) / (task_level − base), at the headline shot count, with a 95 % interval (the same "
             "queries resampled for the three models).", "",
             "| task | base | manyicl | task_level | gap closed |", "|---|---:|---:|---:|---:|"]
    any_row = False
    rng = np.random.default_rng(0)
    for t in tasks:
        b, m, tl = (cell_at(cells, x, t, shots) for x in ("base", "manyicl", "task_level"))
        if not (b and m and tl):
            continue
        any_row = True
        est = [c.estimate() for c in (b, m, tl)]
        denominator = est[2].value - est[0].value
        gap = "n/a (task_level ≤ base)"
        seeds = sorted(set(b.rows) & set(m.rows))
        if denominator > 0 and seeds and tl.rows:
            reference = np.concatenate([next(iter(tl.rows.values()))] * len(seeds))  # task_level: one 0-shot cell
            joint = [np.concatenate([b.rows[s] for s in seeds]), np.concatenate([m.rows[s] for s in seeds]), reference]
            if len({len(x) for x in joint}) == 1:
                draws = replicates(joint, b.from_means, rng)
                ratios = (draws[:, 1] - draws[:, 0]) / (draws[:, 2] - draws[:, 0])
                low, high = interval_of(ratios[np.isfinite(ratios)])
                gap = f"{(est[1].value - est[0].value) / denominator:.2f} [{low:.2f}, {high:.2f}]"
        lines.append(f"| {t} | {_fmt(est[0])} | {_fmt(est[1])} | {_fmt(est[2])} | {gap} |")
    return lines + [""] if any_row else []


def _forgetting_table(cells: dict, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    lines = [f"## Forgetting (benchmarks outside the mixture, {shots} shots)", "",
             "Drop = base − method on the same queries and seeds (paired interval; **bold** = significant after "
             "Benjamini-Hochberg over this table).", "",
             "| task | method | before (base) | after | drop |", "|---|---|---:|---:|---:|"]
    entries = []
    for t in tasks:
        base = cells.get(("base", t, shots))
        for m in methods:
            cell = cells.get((m, t, shots))
            if m == "base" or cell is None:
                continue
            paired = _paired(base, cell) if base else None
            drop = paired_average([paired], [cell.from_means]) if paired is not None else None
            entries.append((t, m, base, cell, drop))
    marks = iter(significant([d.p_value for *_, d in entries if d is not None]))
    for t, m, base, cell, drop in entries:
        text = "–"
        if drop is not None:
            text = f"{drop.difference:+.3f} [{drop.low:+.3f}, {drop.high:+.3f}]"
            text = f"**{text}**" if next(marks) else text
        lines.append(f"| {t} | {m} | {_fmt(base.estimate() if base else None)} | {_fmt(cell.estimate())} | {text} |")
    return lines + [""]


def _flagged(results: list[dict]) -> list[str]:
    flagged = [r for r in results if r.get("collapsed")]
    if not flagged:
        return []
    lines = ["## Cells where one label takes ≥ 90 % of the predictions", "",
             "These measure the demonstrations' label mix more than the model: read them with their histograms.", "",
             "| method | task | shots | seed | predictions | golds | demonstrations |", "|---|---|---:|---:|---|---|---|"]
    for r in flagged:
        lines.append(f"| {r['method']} | {r['task']} | {r['shots_requested']} | {r['seed']} | {r['prediction_counts']} | "
                     f"{r['gold_counts']} | {r.get('demo_labels', {})} |")
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
    for ax, t in zip(axes.flat, tasks):
        first = next(c for (_, tt, _), c in cells.items() if tt == t).first
        for m in methods:
            if m == "task_level" and (m, t, "0") in cells:
                e = cells[m, t, "0"].estimate()
                ax.axhline(e.value, color="red", linestyle=":", label=m)
                if not np.isnan(e.low):
                    ax.axhspan(e.low, e.high, color="red", alpha=0.08)
                continue
            points = sorted((c.shots, c.estimate()) for (mm, tt, _), c in cells.items() if mm == m and tt == t)
            if not points:
                continue
            xs = [max(x, 0.5) for x, _ in points]
            line, = ax.plot(xs, [e.value for _, e in points], marker="o", label=m)
            ax.fill_between(xs, [e.low for _, e in points], [e.high for _, e in points], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{t} ({first['family']})")
        ax.set_xlabel("demonstrations in context (0 plotted at 0.5)")
        ax.set_ylabel(first["metric"])
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    scaling = plot_dir / "shot_scaling.png"
    fig.savefig(scaling, dpi=110)
    plt.close(fig)

    # methods by family at the headline shot count, with 95 % intervals
    families: dict[str, list[str]] = {}
    for t in tasks:
        families.setdefault(next(c for (_, tt, _), c in cells.items() if tt == t).first["family"], []).append(t)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families) + 2), 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        estimates = [_average(cells, m, members, shots) for members in families.values()]
        heights = [e.value if e else 0.0 for e in estimates]
        errors = [[e.value - e.low if e else 0.0 for e in estimates], [e.high - e.value if e else 0.0 for e in estimates]]
        ax.bar([j + i * width for j in range(len(families))], heights, width, yerr=errors, capsize=2, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], list(families))
    ax.set_ylabel("mean primary metric (95 % interval)")
    ax.set_title(f"Held-out tasks by family at {shots} shots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bars = plot_dir / "methods_by_family.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [scaling, bars]
