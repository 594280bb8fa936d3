"""How many query tokens one scoring forward should hold: the shared-prefix backend at several group sizes.

SmolLM2-135M-Instruct, the untuned model, ``max`` demonstrations (seed 0, label-balanced) in a 4,096- and a
2,048-token budget, the first ``--queries`` test queries of each task, ranked (agnews) and generated (mawps,
lama_P36) cells, each at ``score_group_tokens`` 2,048 / 512 / 256 for ranked cells and ``batch_tokens`` (generation's
groups) 2,048 / 512 / 256 for generated ones, in this process, after one warm-up cell; each size runs ``--repeats``
times, the sizes interleaved, and the fastest run counts (this machine's timings vary by 20 % run to run). A cell's
wall time includes its prefix pass. Predictions must be identical at every size (printed).

    python bench/eval_groups.py [--queries 60] [--repeats 2] [--data ../shared/data]

Last line: RESULT score_512_vs_2048_at_4096=<s at 2,048 / s at 512, agnews 4,096> score_512_vs_2048_at_2048=<same,
2,048> identical=<true|false>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from manyicl.evaluation import Prompter, evaluate_cell
from manyicl.evaluation.backend_hf import SharedPrefixBackend
from manyicl.formatter import Formatter
from manyicl.models import load_model, load_tokenizer
from manyicl.task_files import load_task_dir

ROOT = Path(__file__).resolve().parents[1]
SIZES = (2048, 512, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m").eval()
    seconds, identical = {}, True
    for name, budget in [("agnews", 4096), ("agnews", 2048), ("mawps", 2048), ("lama_P36", 4096)]:
        task = load_task_dir(Path(args.data) / name)
        prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), budget)
        queries = task.test[: args.queries]
        demos = prompter.choose_demonstrations("max", 0, True, queries)
        first = None
        if not seconds:  # warm-up: the first cell of a process pays one-time costs
            evaluate_cell(SharedPrefixBackend(model, tokenizer), prompter, demos, queries[:8])
        for size in [size for _ in range(args.repeats) for size in SIZES]:
            backend = SharedPrefixBackend(model, tokenizer, batch_tokens=max(size, 2048) if task.labels else size)
            backend.score_group_tokens = size
            prompter.calibration.clear()  # every timed cell scores its content-free queries, as a cell does
            start = time.perf_counter()
            out = evaluate_cell(backend, prompter, demos, queries)
            took = time.perf_counter() - start
            seconds[name, budget, size] = min(took, seconds.get((name, budget, size), took))
            predictions = [p.prediction for p in out.predictions]
            first = first or predictions
            identical &= predictions == first
            what = "score_group_tokens" if task.labels else "batch_tokens"
            print(f"{name}, {out.shots} shots in {budget} tokens, {len(queries)} queries, {what} {size}: "
                  f"{took:.1f} s, same predictions: {predictions == first}", flush=True)
    ratio = lambda budget: seconds["agnews", budget, 2048] / seconds["agnews", budget, 512]  # noqa: E731
    print(f"RESULT score_512_vs_2048_at_4096={ratio(4096):.2f} score_512_vs_2048_at_2048={ratio(2048):.2f} "
          f"identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
