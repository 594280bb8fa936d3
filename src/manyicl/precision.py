"""Training precision: ``training.precision: auto | fp32 | bf16``.

bf16 is autocast (the Trainer's ``bf16=True``): matmuls and attention run in bfloat16 while the weights that
train (LoRA, or the full model loaded in fp32), their gradients and the optimizer state stay fp32; the loss is
computed from fp32 logits (loss.py).

``auto`` picks bf16 on a CUDA device with bf16 support and fp32 on CPU. On this project's CPUs (AVX-512 BF16)
bf16 autocast made a LoRA step 1.37x faster at 1024 tokens and 1.39x at 4096, but 30 steps on the same sequences
from the same initialisation ended with losses 15 % above fp32's on average (``python bench/train_throughput.py``,
docs/BENCHMARKS.md): not a free speed-up, so a CPU run uses bf16 only when asked (``precision: bf16``), and only
on a CPU that runs it fast (AVX-512 BF16 or AMX).
"""

from __future__ import annotations

from typing import Any

import torch

from manyicl.errors import ManyICLError


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles (torch's own CPU feature probes; False where this torch has none)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(requested: str, model: Any) -> str:
    """"bf16" or "fp32" for this run. A model loaded in bfloat16 (``training.dtype``) trains in bf16 whatever asked."""
    if getattr(model, "dtype", None) == torch.bfloat16:
        return "bf16"
    cuda = torch.cuda.is_available()
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ManyICLError("training.precision=bf16: this GPU has no bfloat16 support; use fp32 (or auto)")
    if requested == "bf16" and not cuda and not cpu_has_fast_bf16():
        raise ManyICLError("training.precision=bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be slower "
                           "than fp32; use fp32 (or auto)")
    return requested
