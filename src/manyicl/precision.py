"""Training precision: ``training.precision: auto | fp32 | bf16``.

bf16 is autocast (the Trainer's ``bf16=True``): matmuls and attention run in bfloat16 while the weights that
train (LoRA, or the full model loaded in fp32), their gradients and the optimizer state stay fp32; the loss is
computed from fp32 logits (loss.py). A LoRA layer adds its update to the frozen projection's output in fp32
(``keep_lora_sums_fp32``): PEFT adds it to the bf16 output and keeps the sum in bf16, where an update below the
output's rounding step (2^-8 of it) vanishes from the forward pass while its gradient still flows, so early
training sees little of its own updates. Measured on SmolLM2, 30 steps of 1,024 tokens on the same sequences
(``python bench/train_throughput.py --curves-only``): mean relative loss difference to fp32 0.149 with PEFT's bf16
sum, 0.013 with the fp32 sum, at the same speed.

``auto`` picks bf16 where it runs faster. On a CUDA device: where it supports bf16. On a CPU without AVX-512 BF16 or
AMX: fp32 (faster there than bf16, emulated or not). On a CPU with them the flags do not settle it (a LoRA step
was 1.35-1.48x faster in bf16 on one such CPU and slower on another, docs/BENCHMARKS.md), so ``auto`` measures:
``measure_cpu_precision`` times forward+backward passes of the loaded model in fp32 and in bf16 autocast and picks
bf16 only where it is faster by a margin; the result is cached per CPU, torch, model and shape under
``$MANYICL_CACHE`` and recorded in train_summary.json. The precision a run resolved to is recorded in every
checkpoint and in train_summary.json; resuming under another one is refused (checkpoints.check_precision).

``precision: bf16`` on a CPU without AVX-512 BF16 or AMX trains with ``EmulatedBf16Kernels``: the same bf16
roundings, computed on fp32 kernels, since torch's own bf16 kernels there are ~15x slower than fp32. It is what
carries a bf16 run on to such a CPU (a run's methods must share one precision: compare.py); ``auto`` still picks
fp32 there, which is faster again (``python bench/bf16_emulation.py``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, ContextManager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from manyicl.errors import ManyICLError


def _widen_bf16(module: Any, inputs: Any, output: Any) -> Any:
    return output.float() if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16 else output


def keep_lora_sums_fp32(model: Any) -> int:
    """Under autocast, make each LoRA layer's frozen projection hand its (bf16-computed) output on in fp32, so the
    LoRA update is added, and the sum kept, in fp32 (PEFT keeps the dtype of the frozen output). The next matmul
    casts back to bf16 as autocast does anyway. Returns how many layers were changed."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules()
              if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
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
    return requested  # bf16 on a CPU without bf16 instructions: emulated (bf16_kernels)


# ---------------------------------------------------------------- bf16 on a CPU without bf16 instructions

aten = torch.ops.aten
# the ops that compute in bf16 under autocast, and which of their outputs the native kernel returns in bf16 (None:
# its one output); everything else (elementwise, norms, the loss) runs as it would anyway
_BF16_OUTPUTS = {
    aten.mm.default: None, aten.addmm.default: None, aten.bmm.default: None, aten.baddbmm.default: None,
    aten.mv.default: None, aten.addmv.default: None, aten.dot.default: None,
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),  # (output, logsumexp): logsumexp is fp32
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2),  # the gradients of q, k, v
}


def _widen(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


def _is_cpu_bf16(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and value.device.type == "cpu"


class EmulatedBf16Kernels(TorchDispatchMode):
    """bf16 matmuls and attention computed as the bf16 instructions compute them, on fp32 kernels: the inputs are
    bf16 (autocast rounded them), each product of two bf16 numbers is exact in fp32 (8 + 8 significant bits), the
    products are summed in fp32 and the result is rounded to bf16. What differs from AVX-512 BF16 / AMX kernels is
    the order of the fp32 sums, and attention: torch's bf16 flash kernel rounds its softmax weights to bf16 before
    multiplying by the values, here they stay fp32. A dispatch mode sits below autograd, so the backward's
    matmuls are covered too. Measured side by side: ``python bench/bf16_emulation.py``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        narrowed = _BF16_OUTPUTS.get(func, False)
        if narrowed is False or not any(_is_cpu_bf16(a) for a in args):
            return func(*args, **kwargs)
        out = func(*tree_map(_widen, args), **tree_map(_widen, kwargs))
        if narrowed is None:
            return out.to(torch.bfloat16)
        return tuple(t.to(torch.bfloat16) if i in narrowed else t for i, t in enumerate(out))


def bf16_kernels(precision: str) -> str | None:
    """"native" or "emulated" for a run in bf16 here (None in fp32): emulated on a CPU without bf16 instructions."""
    if precision != "bf16":
        return None
    return "native" if torch.cuda.is_available() or cpu_has_fast_bf16() else "emulated"


def bf16_compute(precision: str) -> ContextManager:
    """Where a training step runs: ``EmulatedBf16Kernels`` for bf16 on a CPU without bf16 instructions."""
    return EmulatedBf16Kernels() if bf16_kernels(precision) == "emulated" else nullcontext()


def training_precision(training: Any) -> str | None:
    """The precision a run with this ``training`` config resolves to here, without loading the model; None where
    ``auto`` is decided by a measurement not made yet (``needs_measurement``)."""
    from manyicl.models import default_dtype

    dtype = default_dtype() if training.dtype == "auto" else getattr(torch, training.dtype)
    return None if needs_measurement(training.precision, dtype) else resolve_precision(training.precision, dtype)


# ---------------------------------------------------------------- auto on a CPU with bf16 instructions: measured

# longer runs are probed at this length, to keep the probe near 20 s (a 2,048-token step takes 14-18 s here); on this
# project's CPU the bf16/fp32 ratio at 512 tokens (0.79) picked what the 2,048-token step prefers (0.75):
# python bench/precision_probe.py
PROBE_TOKENS = 512
MARGIN = 0.9  # bf16 is picked only where its step takes at most 90 % of fp32's


@dataclass(frozen=True)
class PrecisionProbe:
    choice: str  # "bf16" or "fp32"
    fp32_seconds: float  # the faster of the timed forward+backward passes
    bf16_seconds: float
    tokens: int
    cpu: str
    cached: bool = False  # read from $MANYICL_CACHE, not measured in this process

    def describe(self) -> str:
        how = "cached measurement" if self.cached else "measured"
        return (f"training.precision auto: {self.choice} ({how} on {self.cpu}: a {self.tokens}-token forward+backward "
                f"takes {self.fp32_seconds:.2f} s in fp32, {self.bf16_seconds:.2f} s in bf16; bf16 needs <= "
                f"{MARGIN:.0%} of fp32)")


def needs_measurement(requested: str, weights_dtype: Any = None) -> bool:
    """``auto`` on a single CPU process with bf16 instructions and fp32 weights: the flags do not settle it."""
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # ranks must agree: several use the flags' answer
    return (requested == "auto" and weights_dtype != torch.bfloat16 and not torch.cuda.is_available() and single
            and cpu_has_fast_bf16())


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_key(model: Any, tokens: int) -> str:
    config = getattr(model, "config", None)
    shape = [getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return json.dumps([cpu_name(), torch.__version__, torch.get_num_threads(), shape, trainable, tokens])


def _timed_pass(model: Any, ids: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, logits_to_keep=64, use_cache=False).logits  # like the target-only loss
    logits.float().logsumexp(-1).mean().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def measure_cpu_precision(model: Any, max_tokens: int, repeats: int = 2) -> PrecisionProbe:
    """fp32 or bf16 autocast for training this model here, by timing both (cached under $MANYICL_CACHE). Gradients
    are cleared afterwards and no weight changes; the Trainer seeds its RNG after this, so training is unaffected."""
    from manyicl.files import write_atomic
    from manyicl.models import cache_dir

    tokens = min(max_tokens, PROBE_TOKENS)
    path = cache_dir() / "precision_probes.json"
    key = _probe_key(model, tokens)
    try:
        cache = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError:  # a damaged cache is measured again
        cache = {}
    if key in cache:
        return PrecisionProbe(**{**cache[key], "cached": True})
    was_training = model.training
    model.train()  # dropout as in training
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    for bf16 in (False, True):  # warm-up: first calls allocate and pick kernels
        _timed_pass(model, ids[:, :128], bf16)
    fp32, bf16 = [], []
    for _ in range(repeats):  # interleaved, so a slow moment of the machine hits both
        fp32.append(_timed_pass(model, ids, False))
        bf16.append(_timed_pass(model, ids, True))
    model.train(was_training)
    choice = "bf16" if min(bf16) <= MARGIN * min(fp32) else "fp32"
    probe = PrecisionProbe(choice, round(min(fp32), 3), round(min(bf16), 3), tokens, cpu_name())
    cache[key] = {k: v for k, v in asdict(probe).items() if k != "cached"}
    try:
        write_atomic(path, json.dumps(cache, indent=1))
    except OSError:  # a read-only cache only costs the next run another measurement
        pass
    return probe
