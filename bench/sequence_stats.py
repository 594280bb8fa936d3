"""How many demonstrations fit a budget, and how fast the builder is (SmolLM2 tokenizer, shared/data).

    python bench/sequence_stats.py [--data ../shared/data] [--sequences 1000]

Prints, for sst2, agnews and the task with the longest mean input, the demonstrations per many_shot_all
sequence at 1024 and 4096 tokens (mean over 20 seeds, and inputs cut), then the wall time to build
--sequences sequences of sst2 at 1024 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sequences", type=int, default=1000)
    args = parser.parse_args()

    from manyicl.formatter import Formatter
    from manyicl.models import load_tokenizer
    from manyicl.sequences import SequenceBuilder
    from manyicl.task_files import list_task_dirs, load_task_dir

    tokenizer = load_tokenizer("smollm2-135m")
    tasks = {name: load_task_dir(Path(args.data) / name) for name in list_task_dirs(args.data)}
    longest = max(tasks, key=lambda n: statistics.mean(len(e.input) for e in tasks[n].train))
    print(f"{'task':<10} {'mean input chars':>16} | "
          f"{'budget':>6} {'demos/seq':>9} {'min':>4} {'max':>4} {'inputs cut':>10}")
    for name in ("sst2", "agnews", longest):
        task = tasks[name]
        for budget in (1024, 4096):
            b = SequenceBuilder(task, tokenizer, Formatter.for_task(task), budget, "many_shot_all")
            seqs = [b.build(seed) for seed in range(20)]
            n = [s.n_demonstrations for s in seqs]
            print(f"{name:<10} {statistics.mean(len(e.input) for e in task.train):>16.0f} | {budget:>6} "
                  f"{statistics.mean(n):>9.1f} {min(n):>4} {max(n):>4} {sum(s.n_truncated for s in seqs):>10}")
    task = tasks["sst2"]
    b = SequenceBuilder(task, tokenizer, Formatter.for_task(task), 1024, "many_shot_all")
    start = time.perf_counter()
    for seed in range(args.sequences):
        b.build(seed)
    seconds = time.perf_counter() - start
    print(f"built {args.sequences} sst2 sequences of 1024 tokens in {seconds:.2f} s "
          f"({1000 * seconds / args.sequences:.2f} ms each)")


if __name__ == "__main__":
    main()
