"""Training precision: ``training.precision: auto | fp32 | bf16``.

bf16 is autocast (the Trainer's ``bf16=True``): matmuls and attention run in bfloat16 while the weights that
train (LoRA, or the full model loaded in fp32), their gradients and the optimizer state stay fp32; the loss is
computed from fp32 logits (loss.py). A LoRA layer adds its update to the frozen projection's output in fp32
(``keep_lora_sums_fp32``): PEFT adds it to the bf16 output and keeps the sum in bf16, where an update below the
output's rounding step (2^-8 of it) vanishes from the forward pass while its gradient still flows, so early
training sees little of its own updates. Measured on SmolLM2, 30 steps of 1,024 tokens on the same sequences
(``python bench/train_throughput.py --curves-only``): mean relative loss difference to fp32 0.149 with PEFT's bf16
sum, 0.013 with the fp32 sum, at the same speed.

``auto`` picks bf16 where it runs fast: a CUDA device with bf16 support, or a CPU with AVX-512 BF16 or AMX (on this
project's CPUs a LoRA step is 1.35-1.48x faster, docs/BENCHMARKS.md); fp32 elsewhere. ``precision: bf16`` on a CPU
without either is refused (it would be slower than fp32). The precision a run resolved to is recorded in every
checkpoint and in train_summary.json; resuming under another one is refused (checkpoints.check_precision).
"""

from __future__ import annotations

from typing import Any

import torch

from manyicl.errors import ManyICLError


def _widen_bf16(module: Any, inputs: Any, output: Any) -> Any:
    return output.float() if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16 else output


def keep_lora_sums_fp32(model: Any) -> int:
    """Under autocast, make each LoRA layer's frozen projection hand its (bf16-computed) output on in fp32, so the
    LoRA update is added, and the sum kept, in fp32 (PEFT keeps the dtype of the frozen output). The next matmul
    casts back to bf16 as autocast does anyway. Returns how many layers were changed."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
    for layer in layers:
        layer.base_layer.register_forward_hook(_widen_bf16)
    return len(layers)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles (torch's own CPU feature probes; False where this torch has none)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(requested: str, weights_dtype: Any = None) -> str:
    """"bf16" or "fp32" for this run. Weights loaded in bfloat16 (``training.dtype``) train in bf16 whatever asked."""
    if weights_dtype == torch.bfloat16:
        return "bf16"
    cuda = torch.cuda.is_available()
    if requested == "auto":
        fast = torch.cuda.is_bf16_supported() if cuda else cpu_has_fast_bf16()
        return "bf16" if fast else "fp32"
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ManyICLError("training.precision=bf16: this GPU has no bfloat16 support; use fp32 (or auto)")
    if requested == "bf16" and not cuda and not cpu_has_fast_bf16():
        raise ManyICLError("training.precision=bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be slower "
                           "than fp32; use fp32 (or auto)")
    return requested


def training_precision(training: Any) -> str:
    """The precision a run with this ``training`` config resolves to here, without loading the model."""
    from manyicl.models import default_dtype

    return resolve_precision(training.precision, default_dtype() if training.dtype == "auto" else getattr(torch, training.dtype))
