"""Evaluation throughput: shared-prefix KV cache vs the naive path, side by side, on the embedded default.

sst2 from shared/data, 200 test queries, one seed, at 16, 64 and 256 shots (256 is capped by the 8K context:
the actual count is printed). The cached path runs every query; the naive path (prefix re-encoded for every
candidate of every query) runs the first --naive-queries queries of the SAME cell, and per-query times and the
predictions/log-probs of those queries are compared.

    python bench/eval_throughput.py [--queries 200] [--naive-queries 8] [--data ../shared/data]

Last line: RESULT speedup_16=<x> speedup_64=<x> speedup_256=<x> identical=<true|false>
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--naive-queries", type=int, default=8)
    parser.add_argument("--shots", default="16,64,256")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()

    import torch

    from manyicl.evaluate import CellEvaluator
    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.tasks import load_task_dir

    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m").eval()
    task = load_task_dir(Path(args.data) / "sst2")
    queries = task.test[: args.queries]
    formatter = Formatter.for_task(task, tokenizer)
    speedups, identical = {}, True
    print(f"{'shots':>5} {'used':>5} {'prefix':>7} | {'cached: wall':>12} {'s/query':>8} {'acc':>6} | "
          f"{'naive: wall':>11} {'s/query':>8} | {'speed-up':>8} | same predictions | max |Δ log-prob|")
    for shots in map(int, args.shots.split(",")):
        cached = CellEvaluator(model, tokenizer, task, formatter, args.max_tokens, prefix_cache=True)
        naive = CellEvaluator(model, tokenizer, task, formatter, args.max_tokens, prefix_cache=False)
        demos = cached.choose_demonstrations(shots, 0, False, queries)
        with torch.inference_mode():
            fast = cached.run(demos, queries)
            slow = naive.run(demos, queries[: args.naive_queries])
        # per query: the cached path pays the prefix once, amortised over its queries
        fast_per_query = fast.seconds / len(queries)
        slow_per_query = slow.seconds / args.naive_queries
        subset = fast.predictions[: args.naive_queries]
        same = [a.prediction for a in subset] == [b.prediction for b in slow.predictions]
        delta = max(abs(a.scores[k] - b.scores[k]) for a, b in zip(subset, slow.predictions) for k in a.scores)
        identical &= same and delta < 1e-4
        speedups[shots] = slow_per_query / fast_per_query
        print(f"{shots:>5} {fast.shots:>5} {fast.prefix_tokens:>7} | {fast.seconds:>11.1f}s {fast_per_query:>8.3f} "
              f"{fast.metrics['value']:>6.3f} | {slow.seconds:>10.1f}s {slow_per_query:>8.3f} | {speedups[shots]:>7.1f}x | "
              f"{str(same):>16} | {delta:.2e}", flush=True)
    if importlib.util.find_spec("lm_eval") is None:
        print("lm-evaluation-harness is not installed: its timing is skipped (it is not a dependency)")
    print("RESULT " + " ".join(f"speedup_{k}={v:.1f}" for k, v in speedups.items()) + f" identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
