"""Why and at what threshold `training.release_freed_memory` (src/manyicl/training/memory.py) serves blocks with mmap.

1. Heap after a gradient-checkpointed forward of a 4096-token many_shot_all sequence (embedded default, LoRA):
   bytes in use vs free-but-held (glibc mallinfo2), and RSS before/after malloc_trim(0).
2. Seconds per 1024-token checkpointed step with glibc's default allocator and with mmap thresholds 1 MB / 4 MB.
Each measurement runs in its own process.

    python bench/cpu_allocator.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def setup(data: str, length: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.sequences import SequenceBuilder
    from manyicl.task_files import load_task_dir
    from manyicl.training.mixture import collate

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    task = load_task_dir(Path(data) / "sst2")
    builder = SequenceBuilder(task, tokenizer, Formatter.for_task(task), length, "many_shot_all")
    model = get_peft_model(load_model("smollm2-135m"),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def batch(seed: int) -> dict:
        seq = builder.build(seed)
        b = collate([{"input_ids": seq.input_ids, "labels": seq.labels, "target_index": seq.target_index(),
                      "position_ids": None, "sequence_id": 0, "task_id": 0}], tokenizer.pad_token_id)
        b.pop("sequence_id"), b.pop("task_id")
        return b

    return model, batch


def heap(data: str) -> dict:
    from manyicl.training.loss import target_only_loss

    model, batch = setup(data, 4096)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    loss = target_only_loss(model, batch(0))[0]  # noqa: F841  (kept alive: the graph holds the checkpoints)
    info = libc.mallinfo2()
    before = rss_mb()
    libc.malloc_trim(0)
    return {"in_use_mb": (info.uordblks + info.hblkhd) / 2**20, "free_held_mb": info.fordblks / 2**20,
            "rss_mb": before, "rss_after_trim_mb": rss_mb()}


def step_time(data: str, threshold: int, steps: int = 2) -> dict:
    import torch

    from manyicl.training.loss import target_only_loss
    from manyicl.training.memory import release_freed_memory

    if threshold:
        release_freed_memory(threshold)
    model, batch = setup(data, 1024)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(seed: int) -> None:
        target_only_loss(model, batch(seed))[0].backward()
        optimizer.step()
        optimizer.zero_grad()

    step(1000)  # warm-up
    start = time.perf_counter()
    for s in range(steps):
        step(s)
    return {"seconds_per_step": (time.perf_counter() - start) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--one", nargs=2, metavar=("WHAT", "THRESHOLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        what, threshold = args.one[0], int(args.one[1])
        print(json.dumps(heap(args.data) if what == "heap" else step_time(args.data, threshold)))
        return

    def child(what: str, threshold: int = 0) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", what, str(threshold), "--data", args.data],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    h = child("heap")
    print(f"4096-token checkpointed forward: heap in use {h['in_use_mb']:.0f} MB, "
          f"free but held {h['free_held_mb']:.0f} MB; "
          f"RSS {h['rss_mb']:.0f} MB -> {h['rss_after_trim_mb']:.0f} MB after malloc_trim(0)")
    default = child("step")["seconds_per_step"]
    print(f"1024-token checkpointed step, glibc default: {default:.2f} s")
    for threshold in (1 << 20, 4 << 20):
        s = child("step", threshold)["seconds_per_step"]
        print(f"1024-token checkpointed step, mmap threshold {threshold >> 20} MB: {s:.2f} s ({s / default - 1:+.0%})")


if __name__ == "__main__":
    main()
