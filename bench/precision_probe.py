"""Does ``precision: auto``'s probe pick what is faster for the real step? Its timings side by side with the
training step it stands for, on this CPU.

    python bench/precision_probe.py [--lengths 512 2048] [--repeats 2]

For each length: the probe (``precision.measure_cpu_precision``, run fresh: no cache; probed at min(length, 1024)
tokens) and a real LoRA training step at that length (target-only loss on a many_shot_all sst2 sequence,
forward + backward, the LoRA sums kept fp32 as training keeps them), best of ``--repeats`` in fp32 and in bf16.
Last lines: RESULT length=<n> probe_choice=<…> probe_bf16_over_fp32=<…> step_bf16_over_fp32=<…> agrees=<yes|no>
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from manyicl.formatter import Formatter
from manyicl.models import load_model, load_tokenizer
from manyicl.sequences import SequenceBuilder
from manyicl.task_files import load_task_dir
from manyicl.training.loss import target_only_loss
from manyicl.training.mixture import collate
from manyicl.training.precision import MARGIN, cpu_has_fast_bf16, keep_lora_sums_fp32, measure_cpu_precision

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def step_seconds(model, batch, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = target_only_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer("smollm2-135m")
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    keep_lora_sums_fp32(model)
    model.train()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AVX-512 BF16 or AMX: {cpu_has_fast_bf16()}")
    task = load_task_dir(DATA / "sst2")
    os.environ["MANYICL_CACHE"] = tempfile.mkdtemp()  # a fresh probe, not this machine's cached one
    for length in args.lengths:
        start = time.perf_counter()
        probe = measure_cpu_precision(model, length)
        probe_wall = time.perf_counter() - start
        seq = SequenceBuilder(task, tokenizer, Formatter.for_task(task), length, "many_shot_all").build(0)
        batch = collate([{"input_ids": seq.input_ids, "labels": seq.labels, "target_index": seq.target_index(),
                          "position_ids": None, "sequence_id": 0, "task_id": 0}], tokenizer.pad_token_id)
        batch = {k: v for k, v in batch.items() if k not in ("sequence_id", "task_id")}
        step_seconds(model, batch, False)  # warm-up
        fp32 = min(step_seconds(model, batch, False) for _ in range(args.repeats))
        bf16 = min(step_seconds(model, batch, True) for _ in range(args.repeats))
        step_choice = "bf16" if bf16 <= MARGIN * fp32 else "fp32"
        print(f"{length} tokens: probe ({probe.tokens} tokens, {probe_wall:.1f} s) fp32 {probe.fp32_seconds:.2f} s, "
              f"bf16 {probe.bf16_seconds:.2f} s -> {probe.choice}; real step fp32 {fp32:.2f} s, bf16 {bf16:.2f} s "
              f"-> {step_choice}")
        print(f"RESULT length={length} probe_choice={probe.choice} probe_seconds={probe_wall:.1f} "
              f"probe_bf16_over_fp32={probe.bf16_seconds / probe.fp32_seconds:.2f} "
              f"step_bf16_over_fp32={bf16 / fp32:.2f} agrees={'yes' if step_choice == probe.choice else 'no'}")


if __name__ == "__main__":
    main()
