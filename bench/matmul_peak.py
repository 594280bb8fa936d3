"""Is bf16 worth it on this CPU? fp32 against bf16 matmul throughput, and what ``training.precision: auto`` picks.

A 2048x2048 matmul, best of 10 after a warm-up, in each dtype, in this process. On a CPU with AVX-512 BF16 or AMX
bf16 runs about 2.3x faster than fp32 (and auto picks bf16); without them torch emulates it and it runs slower
(auto picks fp32).

    python bench/matmul_peak.py

Last line: RESULT fp32_gflops=<…> bf16_gflops=<…> bf16_ratio=<bf16 / fp32> auto=<bf16|fp32>
"""

from __future__ import annotations

import time

import torch

from manyicl.training.precision import cpu_has_fast_bf16, resolve_precision


def gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AVX-512 BF16 or AMX: {cpu_has_fast_bf16()}")
    print(f"RESULT fp32_gflops={fp32:.0f} bf16_gflops={bf16:.0f} bf16_ratio={bf16 / fp32:.2f} "
          f"auto={resolve_precision('auto')}")


if __name__ == "__main__":
    main()
