"""Accuracy of every scoring (sum, mean, per_char, calibrated) x format, from the per-query scores that
``manyicl eval`` keeps, with 95 % intervals and paired differences against ``sum`` with the label hint.

    python scripts/scoring_study.py RUN_WITH_HINT RUN_WITHOUT_HINT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from manyicl.families import SCORINGS
from manyicl.formatter import MAX_HINT_LABELS
from manyicl.uncertainty import average_interval, paired_average, significant

ACCURACY = lambda means: means[..., 0]  # noqa: E731


def correct(run: Path, scoring: str) -> dict[tuple, np.ndarray]:
    """(task, shots, seed) -> 0/1 per query, predicting with ``scoring`` (skipped queries are wrong)."""
    out = {}
    for r in json.loads((run / "results.json").read_text()):
        rows = []
        for line in (run / r["predictions"]).read_text().splitlines():
            p = json.loads(line)
            if p["skipped"]:
                rows.append([0.0])
                continue
            scores = p["scores"][scoring]
            rows.append([float(max(scores, key=scores.get) in p["golds"])])
        out[r["task"], str(r["shots_requested"]), r["seed"]] = np.asarray(rows)
    return out


def main() -> None:
    runs = {"label hint": Path(sys.argv[1]), "no hint": Path(sys.argv[2])}
    table = {(fmt, s): correct(run, s) for fmt, run in runs.items() for s in SCORINGS}
    # the shipped default: the hint where a task has 2-3 labels (formatter.MAX_HINT_LABELS), none otherwise
    hinted = {r["task"] for r in json.loads((runs["label hint"] / "results.json").read_text())
              if r["family"] in ("classification", "nli") and 2 <= len(r["gold_counts"]) <= MAX_HINT_LABELS}
    for s in SCORINGS:
        table["hint if <= 3 labels", s] = {key: table["label hint" if key[0] in hinted else "no hint", s][key]
                                            for key in table["label hint", s]}
    reference = table["label hint", "sum"]
    tasks = sorted({t for t, _, _ in reference})
    shot_counts = sorted({k for _, k, _ in reference}, key=int)
    shipped = table["hint if <= 3 labels", "sum"]
    print("| format | scoring | " + " | ".join(f"{t} @{k}" for k in shot_counts for t in tasks)
          + " | average | vs label hint + sum | vs hint if <= 3 labels + sum |")
    print("|---|---|" + "---:|" * (len(tasks) * len(shot_counts) + 3))
    rows, comparisons = [], []
    for (fmt, scoring), cells in table.items():
        by_cell = [[cells[t, k, s] for s in sorted({s for tt, kk, s in cells if (tt, kk) == (t, k)})]
                   for k in shot_counts for t in tasks]
        per_cell = [average_interval([c], [ACCURACY]) for c in by_cell]
        average = average_interval(by_cell, [ACCURACY] * len(by_cell))
        for ref, ref_name in ((reference, ("label hint", "sum")), (shipped, ("hint if <= 3 labels", "sum"))):
            pairs = [(np.concatenate([cells[key] for key in sorted(cells) if key[:2] == (t, k)]),
                      np.concatenate([ref[key] for key in sorted(ref) if key[:2] == (t, k)]))
                     for k in shot_counts for t in tasks]
            comparisons.append(None if (fmt, scoring) == ref_name else paired_average(pairs, [ACCURACY] * len(pairs)))
        rows.append((fmt, scoring, per_cell, average))
    marks = iter(significant([c.p_value for c in comparisons if c is not None]))

    def cell(c) -> str:
        if c is None:
            return "reference"
        text = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
        return f"**{text}**" if next(marks) else text

    for k, (fmt, scoring, per_cell, average) in enumerate(rows):
        print(f"| {fmt} | {scoring} | " + " | ".join(f"{e.value:.3f} [{e.low:.2f}, {e.high:.2f}]" for e in per_cell)
              + f" | {average.value:.3f} [{average.low:.3f}, {average.high:.3f}] | {cell(comparisons[2 * k])} | "
              f"{cell(comparisons[2 * k + 1])} |")


if __name__ == "__main__":
    main()
