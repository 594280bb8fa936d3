"""The report of a compare run: tables (method x task, gap closed, forgetting) and plots, from results.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from manyicl.errors import ManyICLError

METHOD_ORDER = ["base", "zero_shot_ft", "few_shot_ft", "many_shot_last_ft", "manyicl", "task_level"]


def _shots_key(k: Any) -> float:
    return float("inf") if k == "max" else float(k)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(results: list[dict]) -> str:
    """Mean ± std over seeds per (method, task, shots)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["task"], str(r["shots_requested"])), []).append(r)
    lines = [f"{'method':<18} {'task':<22} {'shots':>6} {'used':>5} {'metric':<14} {'value':>15} {'n':>5} {'s/query':>8}"]
    for (method, task, k), rs in groups.items():
        values = [r["value"] for r in rs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        per_query = sum(r["seconds"] for r in rs) / max(sum(r["n"] for r in rs), 1)
        lines.append(
            f"{method:<18} {task:<22} {k:>6} {rs[0]['shots']:>5} {rs[0]['metric']:<14} "
            f"{statistics.mean(values):>8.3f} ± {std:.3f} {rs[0]['n']:>5} {per_query:>8.3f}"
        )
    return "\n".join(lines)


def aggregate(results: list[dict]) -> dict[tuple, dict]:
    """(method, task, shots_requested) -> mean, std over seeds, and the cell's facts."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["task"], str(r["shots_requested"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        mean, std = _mean_std([r["value"] for r in rs])
        out[key] = {"mean": mean, "std": std, "shots": round(statistics.mean(r["shots"] for r in rs)),
                    "family": rs[0]["family"], "metric": rs[0]["metric"], "role": rs[0].get("role", "held_out"), "n": rs[0]["n"]}
    return out


def _methods(results: list[dict]) -> list[str]:
    present = {r["method"] for r in results}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def headline_shots(results: list[dict], role: str = "held_out") -> str:
    """The largest shot count requested (``max`` if it was): where many-shot methods are compared."""
    return str(max({r["shots_requested"] for r in results if r.get("role", "held_out") == role}, key=_shots_key))


def value_at(agg: dict, method: str, task: str, shots: str) -> dict | None:
    # task_level is a zero-shot model: its reference value is at 0 shots when it was evaluated there
    if method == "task_level" and (method, task, "0") in agg:
        return agg[method, task, "0"]
    return agg.get((method, task, shots))


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise ManyICLError(f"{run_dir}: no results.json; run manyicl compare or manyicl eval first")
    results = json.loads(path.read_text(encoding="utf-8"))
    if not results:
        raise ManyICLError(f"{path}: holds no results yet")
    agg = aggregate(results)
    methods = _methods(results)
    held = sorted({r["task"] for r in results if r.get("role", "held_out") == "held_out"})
    forgetting = sorted({r["task"] for r in results if r.get("role") == "forgetting"})
    shots = headline_shots(results) if held else "0"
    lines = [f"# ManyICL comparison: {run_dir.name}", ""]
    lines += _setup_lines(run_dir, results, methods)
    if held:
        lines += _main_table(agg, methods, held, shots)
        lines += _gap_closed(agg, held, shots)
    if forgetting:
        lines += _forgetting_table(agg, methods, forgetting, headline_shots(results, "forgetting"))
    plots = _plots(run_dir, agg, methods, held, shots)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in plots] + [""]
    lines += ["All records: [results.json](results.json); predictions per cell under `predictions/`.", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _setup_lines(run_dir: Path, results: list[dict], methods: list[str]) -> list[str]:
    lines = [f"Model: `{results[0]['model']}`. Seeds: {sorted({r['seed'] for r in results})}. "
             f"Context budget at evaluation: {results[0].get('max_tokens')} tokens.", ""]
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


def _fmt(cell: dict | None) -> str:
    return "–" if cell is None else f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def _main_table(agg: dict, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    lines = [f"## Held-out tasks at {shots} shots", "",
             "Primary metric, mean ± std over seeds (task_level: its 0-shot value, the dedicated-model reference).", "",
             "| task | family | metric | " + " | ".join(methods) + " |", "|---|---|---|" + "---:|" * len(methods)]
    families: dict[str, dict[str, list[float]]] = {}
    for t in tasks:
        cells = [value_at(agg, m, t, shots) for m in methods]
        first = next(c for c in cells if c)
        lines.append(f"| {t} | {first['family']} | {first['metric']} | " + " | ".join(_fmt(c) for c in cells) + " |")
        for m, c in zip(methods, cells):
            if c:
                families.setdefault(first["family"], {}).setdefault(m, []).append(c["mean"])
    for fam, by_method in sorted(families.items()):
        lines.append(f"| **{fam} average** | | | " + " | ".join(
            f"**{statistics.mean(by_method[m]):.3f}**" if m in by_method else "–" for m in methods) + " |")
    return lines + [""]


def _gap_closed(agg: dict, tasks: list[str], shots: str) -> list[str]:
    lines = ["## Gap closed by ManyICL", "", "(manyicl − base) / (task_level − base), at the headline shot count.", "",
             "| task | base | manyicl | task_level | gap closed |", "|---|---:|---:|---:|---:|"]
    any_row = False
    for t in tasks:
        b, m, tl = (value_at(agg, x, t, shots) for x in ("base", "manyicl", "task_level"))
        if b and m and tl:
            denom = tl["mean"] - b["mean"]
            gap = "n/a (task_level ≤ base)" if denom <= 0 else f"{(m['mean'] - b['mean']) / denom:.2f}"
            lines.append(f"| {t} | {b['mean']:.3f} | {m['mean']:.3f} | {tl['mean']:.3f} | {gap} |")
            any_row = True
    return lines + [""] if any_row else []


def _forgetting_table(agg: dict, methods: list[str], tasks: list[str], shots: str) -> list[str]:
    lines = [f"## Forgetting (benchmarks outside the mixture, {shots} shots)", "",
             "| task | method | before (base) | after | drop |", "|---|---|---:|---:|---:|"]
    for t in tasks:
        base = agg.get(("base", t, shots))
        for m in methods:
            cell = agg.get((m, t, shots))
            if m == "base" or cell is None:
                continue
            before = f"{base['mean']:.3f}" if base else "–"
            drop = f"{base['mean'] - cell['mean']:+.3f}" if base else "–"
            lines.append(f"| {t} | {m} | {before} | {cell['mean']:.3f} ± {cell['std']:.3f} | {drop} |")
    return lines + [""]


def _plots(run_dir: Path, agg: dict, methods: list[str], tasks: list[str], shots: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        return []
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    # metric vs shots, one panel per task, one line per method (the paper's shot-scaling figure)
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for m in methods:
            points = sorted(((c["shots"], c["mean"], c["std"]) for (mm, tt, _), c in agg.items() if mm == m and tt == t))
            if not points:
                continue
            if m == "task_level" and (m, t, "0") in agg:
                ax.axhline(agg[m, t, "0"]["mean"], color="red", linestyle=":", label=m)
                continue
            xs, ys, es = zip(*points)
            ax.errorbar([max(x, 0.5) for x in xs], ys, yerr=es, marker="o", capsize=2, label=m)
        first = next(c for (mm, tt, _), c in agg.items() if tt == t)
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

    # methods by family at the headline shot count
    families = sorted({c["family"] for (_, t, _), c in agg.items() if t in tasks})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families) + 2), 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        heights = []
        for fam in families:
            vals = [c["mean"] for t in tasks if (c := value_at(agg, m, t, shots)) and c["family"] == fam]
            heights.append(statistics.mean(vals) if vals else 0.0)
        ax.bar([j + i * width for j in range(len(families))], heights, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    ax.set_ylabel("mean primary metric")
    ax.set_title(f"Held-out tasks by family at {shots} shots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bars = plot_dir / "methods_by_family.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [scaling, bars]
