"""What the in-context learning curve costs per task: building its sequences and one forward each.

    python bench/curve_cost.py [--tasks agnews rte aeslc] [--max-tokens 2048] [--sequences 20]

Per task: seconds to build the sequences (tokenization), seconds for the forwards, answers per sequence. On the
embedded model (SmolLM2-135M) in the evaluation's precision (fp32 on CPU), as `manyicl eval` runs it.
Last line: RESULT seconds_per_task=<mean> forward_s_per_sequence=<mean>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from manyicl.evaluation.curves import answer_losses, curve_sequences
from manyicl.formatter import Formatter
from manyicl.models import for_inference, load_model, load_tokenizer
from manyicl.task_files import load_task_dir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["agnews", "rte", "lama_P36", "aeslc"])
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    model = for_inference(load_model("smollm2-135m"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.max_tokens} tokens, "
          f"{args.sequences} sequences per task, weights {next(model.parameters()).dtype}")
    print("| task | build s | forward s | s per forward | answers per sequence |")
    print("|---|---:|---:|---:|---:|")
    totals, per_forward = [], []
    for name in args.tasks:
        task = load_task_dir(args.data / name)
        start = time.perf_counter()
        sequences = curve_sequences(task, tokenizer, Formatter.for_task(task, tokenizer), args.max_tokens,
                                    args.sequences)
        built = time.perf_counter() - start
        start = time.perf_counter()
        for seq in sequences:
            answer_losses(model, seq)
        forward = time.perf_counter() - start
        answers = sum(s.n_targets for s in sequences) / len(sequences)
        totals.append(built + forward)
        per_forward.append(forward / len(sequences))
        print(f"| {name} | {built:.1f} | {forward:.1f} | {forward / len(sequences):.2f} | {answers:.1f} |")
    print(f"RESULT seconds_per_task={sum(totals) / len(totals):.1f} "
          f"forward_s_per_sequence={sum(per_forward) / len(per_forward):.2f}")


if __name__ == "__main__":
    main()
