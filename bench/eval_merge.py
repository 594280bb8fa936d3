"""What merging a LoRA adapter into the weights saves at evaluation on CPU, side by side in this process.

SmolLM2-135M-Instruct with a LoRA r=16 on all linear layers (the shipped configs' shape; B drawn at random so the
update is not zero), one forward of ``--length`` tokens of sst2 text, ``--repeats`` timed runs after one warm-up:
the PEFT model as loaded (the update computed beside every projection) against the same model after
``merge_and_unload()`` (the update added into the weights once), which is what evaluation runs (models.for_inference).

    python bench/eval_merge.py [--length 2048] [--repeats 3] [--data ../shared/data]

Last line: RESULT merged_speedup=<s unmerged / s merged> max_logit_diff=<largest |logit| difference>
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from manyicl.models import for_inference, load_model, load_tokenizer
from manyicl.task_files import read_examples

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_forward(model, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
    return (time.perf_counter() - start) / repeats, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    text = "\n\n".join(f"{e.input}\n{e.output}" for e in read_examples(Path(args.data) / "sst2" / "train.jsonl"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length]
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM")).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    merged = for_inference(copy.deepcopy(model))
    unmerged_s, unmerged_logits = seconds_per_forward(model, ids, args.repeats)
    merged_s, merged_logits = seconds_per_forward(merged, ids, args.repeats)
    diff = (unmerged_logits - merged_logits).abs().max().item()
    print(f"{ids.shape[1]} tokens: unmerged {unmerged_s:.2f} s/forward, merged {merged_s:.2f} s/forward")
    print(f"RESULT merged_speedup={unmerged_s / merged_s:.2f} max_logit_diff={diff:.2e}")


if __name__ == "__main__":
    main()
