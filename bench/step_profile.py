"""Where a LoRA training step's time goes on CPU: precision x LoRA dropout, side by side, and a torch.profiler table.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, many_shot_all sst2 sequences of ``--length`` tokens (the same
seeds in every row), target-only loss, one warm-up step then ``--steps`` timed steps, each row in this process in
turn. Rows: fp32 and bf16 autocast (with the LoRA sum kept in fp32, as manyicl trains), LoRA dropout 0 and 0.05
(the shipped configs' value). Then one profiled bf16 step with dropout 0.05: the operators by self CPU time.

    python bench/step_profile.py [--length 1024] [--steps 3] [--data ../shared/data]

Last line: RESULT bf16_speedup_dropout0=<fp32/bf16 s/step, dropout 0> bf16_speedup_dropout005=<same, 0.05>
dropout_cost_fp32=<s/step 0.05 / s/step 0> dropout_cost_bf16=<same in bf16>
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from manyicl.formatter import Formatter
from manyicl.models import load_model, load_tokenizer
from manyicl.sequences import SequenceBuilder
from manyicl.task_files import load_task_dir
from manyicl.training.loss import target_only_loss
from manyicl.training.mixture import collate
from manyicl.training.precision import keep_lora_sums_fp32

ROOT = Path(__file__).resolve().parents[1]


def make_step(builder, tokenizer, precision: str, dropout: float):
    torch.manual_seed(0)
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    if precision == "bf16":
        keep_lora_sums_fp32(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(seed: int) -> float:
        seq = builder.build(seed)
        batch = collate([{"input_ids": seq.input_ids, "labels": seq.labels, "target_index": seq.target_index(),
                          "position_ids": seq.position_ids, "sequence_id": 0, "task_id": 0}], tokenizer.pad_token_id)
        batch.pop("sequence_id"), batch.pop("task_id")
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            loss = target_only_loss(model, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    task = load_task_dir(Path(args.data) / "sst2")
    builder = SequenceBuilder(task, tokenizer, Formatter.for_task(task), args.length, "many_shot_all")
    seconds = {}
    for precision in ("fp32", "bf16"):
        for dropout in (0.0, 0.05):
            step = make_step(builder, tokenizer, precision, dropout)
            step(1000)  # warm-up
            start = time.perf_counter()
            losses = [step(s) for s in range(args.steps)]
            seconds[precision, dropout] = (time.perf_counter() - start) / args.steps
            print(f"{precision} dropout {dropout}: {seconds[precision, dropout]:.2f} s/step "
                  f"(losses {' '.join(f'{x:.3f}' for x in losses)})", flush=True)
    step = make_step(builder, tokenizer, "bf16", 0.05)
    step(1000)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(0)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"RESULT bf16_speedup_dropout0={seconds['fp32', 0.0] / seconds['bf16', 0.0]:.2f} "
          f"bf16_speedup_dropout005={seconds['fp32', 0.05] / seconds['bf16', 0.05]:.2f} "
          f"dropout_cost_fp32={seconds['fp32', 0.05] / seconds['fp32', 0.0]:.2f} "
          f"dropout_cost_bf16={seconds['bf16', 0.05] / seconds['bf16', 0.0]:.2f}")


if __name__ == "__main__":
    main()
