"""bf16 emulated on fp32 kernels (``precision.EmulatedBf16Kernels``) beside fp32 and torch's own bf16 kernels: the
time of a LoRA training step and how far its loss and gradients are from the native bf16 kernels'.

    python bench/bf16_emulation.py [--length 512] [--skip-native]

On one SmolLM2 step (forward + backward, the LoRA sums kept fp32 as training keeps them; B initialised non-zero
so that every gradient is informative), the same random tokens in every mode: fp32; bf16 on torch's kernels
(native; ~15x slower than fp32 on a CPU without AVX-512 BF16, so short lengths there); bf16 emulated; and
bf16 emulated with the matmuls' reduction split in two halves, i.e. the same roundings in another order of
fp32 sums: the size of a difference that order alone makes, which is all emulated and native should differ by.
Last line: RESULT length=<n> emulated_over_fp32=<…> native_over_fp32=<…> grad_emulated_vs_native=<…>
grad_reordered_vs_emulated=<…> grad_fp32_vs_native=<…> (relative L2 differences of the gradient vectors).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from manyicl.models import load_model
from manyicl.precision import EmulatedBf16Kernels, cpu_has_fast_bf16, keep_lora_sums_fp32

aten = torch.ops.aten


class ReorderedBf16Kernels(EmulatedBf16Kernels):
    """The emulation with each mm's reduction summed as two halves: the same roundings, other fp32 sums."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.mm.default and args[0].dtype == torch.bfloat16:
            a, b = args[0].float(), args[1].float()
            half = a.shape[1] // 2
            return (a[:, :half] @ b[:half] + a[:, half:] @ b[half:]).to(torch.bfloat16)
        return super().__torch_dispatch__(func, types, args, kwargs)


MODES = {  # name: (autocast to bf16, the dispatch mode)
    "fp32": (False, nullcontext),
    "native": (True, nullcontext),
    "emulated": (True, EmulatedBf16Kernels),
    "reordered": (True, ReorderedBf16Kernels),
}


def step(model, ids: torch.Tensor, mode: str) -> tuple[float, torch.Tensor, float]:
    bf16, dispatch = MODES[mode]
    start = time.perf_counter()
    with dispatch(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    seconds = time.perf_counter() - start
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, seconds


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--skip-native", action="store_true", help="leave out torch's bf16 kernels (slow here)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    keep_lora_sums_fp32(model)
    model.train()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AVX-512 BF16 or AMX: {cpu_has_fast_bf16()}")
    ids = torch.randint(0, model.config.vocab_size, (1, args.length))
    modes = [m for m in MODES if not (args.skip_native and m == "native")]
    results = {}
    for mode in modes:
        if mode != "native":  # warm-up (torch's bf16 kernels take minutes here: timed once)
            step(model, ids, mode)
        results[mode] = step(model, ids, mode)
        print(f"{mode:>9}: loss {results[mode][0]:.6f}, {results[mode][2]:.2f} s", flush=True)
    seconds = {m: r[2] for m, r in results.items()}
    grads = {m: r[1] for m, r in results.items()}
    line = (f"RESULT length={args.length} emulated_over_fp32={seconds['emulated'] / seconds['fp32']:.2f} "
            f"grad_reordered_vs_emulated={relative(grads['reordered'], grads['emulated']):.4f} "
            f"grad_fp32_vs_emulated={relative(grads['fp32'], grads['emulated']):.4f}")
    if "native" in results:
        line += (f" native_over_fp32={seconds['native'] / seconds['fp32']:.2f} "
                 f"grad_emulated_vs_native={relative(grads['emulated'], grads['native']):.4f} "
                 f"grad_fp32_vs_native={relative(grads['fp32'], grads['native']):.4f}")
    print(line)


if __name__ == "__main__":
    main()
