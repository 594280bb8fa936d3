"""Packed-unit attention, side by side: the ways of keeping packed units apart, on the same real training rows.

The zero- and few-shot baselines train on rows of isolated units packed to the sequence length
(src/manyicl/training/packing.py). How fast such a row trains depends on how the attention is kept within each
unit, and the units of one row can be many: a zero-shot LAMA row holds ~140 one-fact units in 2,048 tokens.
On the embedded model with LoRA (r 8, all linear layers, as configs/real_smollm2.yaml trains), at 2,048 tokens,
one forward + backward per row, the same rows for every way:

  grouped — what manyicl trains with: units of one length class batched into one causal SDPA call
  loop    — one causal SDPA call per unit (what packing.py did before grouping)
  dense   — one SDPA call with the explicit block-diagonal mask (what eager attention and windows get)
  (ref)   — a many-shot row of the same task (one causal SDPA call over the whole row), the method's own speed

Rows: zero_shot of lama_P101 (many tiny units), zero_shot of sst2, few_shot (5 shots) of lama_P101. Every way must
give the same loss and LoRA gradients as `grouped` (printed: the largest relative difference).

    python bench/packed_attention.py [--steps 3] [--precision bf16|fp32] [--data ../shared/data]

Last line: RESULT grouped_vs_loop_<row>=<loop s/step / grouped s/step> grouped_vs_dense_<row>=<...>
grouped_vs_manyshot_<row>=<many-shot s/step / grouped s/step> max_grad_rel_diff=<...>
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("lama_P101", "zero_shot"), ("sst2", "zero_shot"), ("lama_P101", "few_shot")]


def loop_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """The reference: one causal SDPA call per unit (packing.py before its units were grouped by length)."""
    import torch
    import torch.nn.functional as F

    from manyicl.training.packing import unit_bounds

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = unit_bounds(kwargs["position_ids"][0])
    pieces = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                             scale=scaling) for s, e in bounds]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@contextmanager
def attention_way(model: Any, way: str, batch: dict) -> Iterator[None]:
    from manyicl.models import sdpa_replaced
    from manyicl.training.packing import _no_mask, block_causal_mask, packed_attention

    if way == "grouped":
        with packed_attention(model, batch["input_ids"].shape[1]) as per_unit:
            assert per_unit
            yield
    elif way == "loop":
        with sdpa_replaced(model, "bench_packed_loop", loop_attention, _no_mask):
            yield
    else:  # dense: transformers' SDPA with the explicit block-diagonal mask, as the trainer hands it
        batch["attention_mask"] = block_causal_mask(batch["position_ids"])
        try:
            yield
        finally:
            batch.pop("attention_mask")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.sequences import SequenceBuilder
    from manyicl.task_files import load_task_dir
    from manyicl.training.loss import target_only_loss
    from manyicl.training.mixture import collate
    from manyicl.training.precision import keep_lora_sums_fp32

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.precision == "bf16":
        keep_lora_sums_fp32(model)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    lora = [p for p in model.parameters() if p.requires_grad]

    def batch_of(seq: Any) -> dict:
        batch = collate([{"input_ids": seq.input_ids, "labels": seq.labels, "target_index": seq.target_index(),
                          "position_ids": seq.position_ids, "sequence_id": 0, "task_id": 0}], tokenizer.pad_token_id)
        batch.pop("sequence_id"), batch.pop("task_id")
        return batch

    def step(batch: dict) -> tuple[float, float, list]:
        start = time.perf_counter()
        with autocast:
            loss = target_only_loss(model, batch)[0]
        loss.backward()
        seconds = time.perf_counter() - start
        grads = [p.grad.detach().clone() for p in lora]
        model.zero_grad(set_to_none=True)
        return seconds, float(loss), grads

    results, worst = {}, 0.0
    for task_name, objective in ROWS:
        task = load_task_dir(Path(args.data) / task_name)
        packed = SequenceBuilder(task, tokenizer, Formatter.for_task(task), args.length, objective)
        many = SequenceBuilder(task, tokenizer, Formatter.for_task(task), args.length, "many_shot_all")
        rows = [batch_of(packed.build_packed(seed)) for seed in range(args.steps + 1)]
        refs = [batch_of(many.build(seed)) for seed in range(args.steps + 1)]
        units = sum(int((b["position_ids"] == 0).sum()) for b in rows) / len(rows)
        row = f"{task_name}_{objective}"
        times: dict[str, list[float]] = {}
        first: dict[str, tuple[float, list]] = {}
        for i in range(args.steps + 1):  # the ways interleaved step by step, so drifts hit them alike
            for way in ("grouped", "loop", "dense"):
                with attention_way(model, way, rows[i]):
                    seconds, loss, grads = step(rows[i])
                if i == 0:
                    first[way] = (loss, grads)  # the warm-up step: checked, not timed
                else:
                    times.setdefault(way, []).append(seconds)
            seconds, _, _ = step(refs[i])
            if i:
                times.setdefault("many-shot", []).append(seconds)
        loss0, grads0 = first["grouped"]
        for way in ("loop", "dense"):
            loss, grads = first[way]
            rel = max(float((g - g0).norm() / g0.norm().clamp_min(1e-12)) for g, g0 in zip(grads, grads0)
                      if g0.norm() > 0)
            worst = max(worst, rel)
            print(f"{row}: {way} vs grouped: loss {loss:.5f} vs {loss0:.5f}, largest relative LoRA gradient "
                  f"difference {rel:.2e}")
        mean = {way: sum(t) / len(t) for way, t in times.items()}
        print(f"{row} ({units:.0f} units per {args.length}-token row, {args.precision}): "
              + " | ".join(f"{way} {s:.2f} s/step" for way, s in mean.items()), flush=True)
        results[f"grouped_vs_loop_{row}"] = mean["loop"] / mean["grouped"]
        results[f"grouped_vs_dense_{row}"] = mean["dense"] / mean["grouped"]
        results[f"grouped_vs_manyshot_{row}"] = mean["many-shot"] / mean["grouped"]
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in results.items()) + f" max_grad_rel_diff={worst:.2e}")


if __name__ == "__main__":
    main()
