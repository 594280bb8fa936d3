"""How well order-only predictors guess the supervised answers of training sequences, i.i.d. order against the
earlier label-round order (the numbers behind tests/test_leakage.py and docs/RESULTS.md).

    python bench/order_shortcut.py [--tasks sst2 trec snli] [--seeds 8]

Per task and order: the accuracy of "least-seen label so far" and "label missing from the current round" on every
supervised answer of 2,048-token many_shot_all sequences, the majority-label rate there and the upper end of its
binomial 95 % band (a predictor above it is a shortcut).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_leakage as leakage  # noqa: E402  the predictors and the round order live with the test
from manyicl.models import load_tokenizer  # noqa: E402
from manyicl.task_files import load_task_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=leakage.TASKS)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    leakage.SEEDS = range(args.seeds)
    tokenizer = load_tokenizer("smollm2-135m")
    print("| task | order | least seen | missing from round | majority rate | band upper | answers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.tasks:
        task = load_task_dir(args.data / name)
        labels = leakage._labels_by_frequency(task)
        for order, builder in (("i.i.d.", leakage.SequenceBuilder), ("label rounds", leakage.RoundOrderBuilder)):
            rates, majority, n = leakage.predictor_rates(leakage._sequences(builder, task, tokenizer), labels)
            upper = stats.binom.ppf(0.975, n, majority) / n
            print(f"| {name} | {order} | {rates['least_seen']:.3f} | {rates['missing_from_round']:.3f} | "
                  f"{majority:.3f} | {upper:.3f} | {n} |")


if __name__ == "__main__":
    main()
