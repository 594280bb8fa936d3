"""Peak memory on CPU: let freed activations go back to the operating system.

glibc serves allocations below its mmap threshold from the heap and raises that threshold (up to 32 MB)
each time a large block is freed. A training step frees gigabytes of activations in blocks of a few MB to a
few tens of MB; kept in the heap, they end up as free chunks that later blocks of other sizes do not fit, and
the heap keeps growing. Measured on SmolLM2-135M, one gradient-checkpointed 4096-token LoRA step: at the end
of the forward pass 3.1 GB of the heap was free but held, against 0.6 GB in use (`python bench/cpu_allocator.py`).
With a fixed threshold large blocks are mmap-ed and unmapped when freed (`python bench/train_throughput.py`):
peak RSS 5.7 GB -> 2.2 GB, the step 19% slower (the kernel hands out fresh zeroed pages). Training turns this on
together with gradient checkpointing, the setting that already trades speed for memory, unless told otherwise,
and for the training phase only (``freed_memory_released``): evaluation afterwards, in the same process
(``manyicl compare``), runs with large blocks kept in the heap again.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3  # setting it also turns off glibc's dynamic raise of the threshold, for good
# What glibc's dynamic rule sets once it has seen freed blocks of 32 MB or more (evaluation's activations are):
# the mmap threshold at its 64-bit ceiling (DEFAULT_MMAP_THRESHOLD_MAX) and the trim threshold at twice that.
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 64 << 20


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return None


def release_freed_memory(threshold_bytes: int = 4 << 20) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more with mmap, for the rest of this process.

    4 MB: long-sequence activations (a 4096 x 576 fp32 hidden state is 9.4 MB) go to mmap; the many small
    blocks stay in the heap, where they cost no page faults. A 1024-token checkpointed SmolLM2 step was 61%
    slower at 1 MB, 10% at 4 MB (`python bench/cpu_allocator.py`).

    Returns False where this does not apply (not Linux, or a C library without glibc's ``mallopt``)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def keep_freed_memory() -> bool:
    """Back to keeping large freed blocks in the heap, as glibc does once its dynamic threshold has risen.

    glibc cannot turn its dynamic rule back on after ``mallopt``; this sets the values that rule reaches."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


@contextmanager
def freed_memory_released(threshold_bytes: int = 4 << 20) -> Iterator[bool]:
    """``release_freed_memory`` inside the block only; yields whether it applies on this platform."""
    applied = release_freed_memory(threshold_bytes)
    try:
        yield applied
    finally:
        if applied:
            keep_freed_memory()
