"""Training throughput of the target-only loss, side by side, on the embedded default model with LoRA.

Paths over IDENTICAL sst2 sequences (shared/data), at 1024 and 4096 tokens:
  (a) many_shot_all  — target-only loss on every answer (ManyICL)
  (b) many_shot_last — target-only loss on the last answer only (the baseline objective)
  (c) plain          — transformers' full-logits loss, labels = -100 outside the answers
  (z) packed zero-shot — isolated one-example units packed up to the length, attention within each unit
                       (src/manyicl/training/packing.py); (zd) the same rows through transformers' dense block mask
(b) differs from (a) only in how many answers it supervises, so it runs at the short length only.
Precision: the rows above run fp32 (``training.precision: fp32``); (a) runs again with bf16 autocast
(``precision: bf16``, what auto picks on a CPU with AVX-512 BF16) at both lengths, and (z)/(zd) run in both
precisions at the short length.
packed_ratio: (z) / (a) tokens/s at the short length in fp32, the precision CPU runs train in.
bf16_loss_diff: 30 steps of (a) at the short length in fp32 and in bf16 on the same sequences from the same
LoRA initialisation, mean over steps of |loss_bf16 - loss_fp32| / loss_fp32.
At the long length (a) and (c) also run with gradient checkpointing, the setting for long sequences, first with
glibc's default allocator, then as `manyicl train` runs them on CPU (freed blocks returned to the OS, see
src/manyicl/training/memory.py): with the default allocator, freed activations stay in the heap and hide what the
target-only loss saves. Each configuration runs in its own process so peak memory (ru_maxrss) is not shared.

    python bench/train_throughput.py [--steps 2] [--data ../shared/data]

Last line: RESULT answers_per_s_ratio=<a/b @1024> peak_mem_ratio_4096=<a/c, checkpointed, as manyicl trains>
tokens_per_s_ratio=<a/c @4096> mfu=<a @4096> bf16_speedup_1024=<a bf16/fp32> bf16_speedup_4096=<a bf16/fp32>
bf16_loss_diff=<30 steps> packed_ratio=<z/a tokens/s @1024, fp32>
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"a": "many_shot_all", "b": "many_shot_last", "c": "plain", "z": "packed zero_shot",
         "zd": "packed zero_shot, dense mask"}


def matmul_peak_flops(size: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - start)


def one(path: str, length: int, steps: int, data: str, checkpointing: bool, release: bool,
        precision: str = "fp32") -> dict:
    """Runs in a child process: warm-up step, then ``steps`` timed LoRA optimizer steps."""
    from contextlib import nullcontext

    import torch
    from peft import LoraConfig, get_peft_model

    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.sequences import SequenceBuilder
    from manyicl.task_files import load_task_dir
    from manyicl.training.loss import full_logits_loss, target_only_loss
    from manyicl.training.memory import release_freed_memory
    from manyicl.training.mixture import collate
    from manyicl.training.packing import packed_attention
    from manyicl.training.precision import keep_lora_sums_fp32

    if release and not release_freed_memory():
        raise SystemExit("release_freed_memory does not apply on this platform (needs Linux with glibc)")
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    task = load_task_dir(Path(data) / "sst2")
    objective = {"b": "many_shot_last", "z": "zero_shot", "zd": "zero_shot"}.get(path, "many_shot_all")
    builder = SequenceBuilder(task, tokenizer, Formatter.for_task(task), length, objective)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    model = load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if precision == "bf16":
        keep_lora_sums_fp32(model)  # as manyicl trains in bf16
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_losses = []

    def step(seed: int) -> tuple[int, int, int]:
        seq = builder.build_packed(seed) if path in ("z", "zd") else builder.build(seed)  # same seeds in every path
        batch = collate([{"input_ids": seq.input_ids, "labels": seq.labels, "target_index": seq.target_index(),
                          "position_ids": seq.position_ids, "sequence_id": 0, "task_id": 0}], tokenizer.pad_token_id)
        batch.pop("sequence_id"), batch.pop("task_id")
        with autocast:
            loss = full_logits_loss(model, batch) if path == "c" else target_only_loss(model, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_losses.append(loss.item())
        return seq.n_tokens, seq.n_targets, sum(e - s for s, e in seq.target_spans)

    with packed_attention(model, length) if path == "z" else nullcontext():
        step(1000)  # warm-up
        step_losses.clear()
        tokens = answers = target_positions = 0
        start = time.perf_counter()
        for s in range(steps):
            t, a, p = step(s)
            tokens, answers, target_positions = tokens + t, answers + a, target_positions + p
        seconds = time.perf_counter() - start
    cfg = model.get_base_model().config
    body = sum(p.numel() for n, p in model.get_base_model().model.layers.named_parameters())
    mean_t = tokens / steps
    # LoRA: forward 2N + backward through activations 2N per token (frozen weights get no weight gradient)
    head_positions = mean_t if path == "c" else target_positions / steps
    flops_per_step = (4 * body * mean_t + 6 * cfg.num_hidden_layers * cfg.hidden_size * mean_t**2
                      + 4 * cfg.vocab_size * cfg.hidden_size * head_positions)
    return {
        "path": path, "length": length, "steps": steps, "seconds_per_step": seconds / steps,
        "tokens_per_s": tokens / seconds, "answers_per_s": answers / seconds, "answers_per_step": answers / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_over_model_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_loaded) / 1024,
        "flops_per_s": flops_per_step * steps / seconds, "losses": step_losses,
    }


def run_one(key: tuple, steps: int, data: str) -> dict:
    """One row in a fresh process (so peak RSS is that row's alone)."""
    path, length, gc, release, precision = key
    out = subprocess.run([sys.executable, __file__, "--one", path, str(length), str(gc), str(release), precision,
                          "--steps", str(steps), "--data", data], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--curve-steps", type=int, default=30, help="steps of the fp32 vs bf16 loss curves")
    parser.add_argument("--curves-only", action="store_true",
                        help="only the fp32 vs bf16 loss curves at the short length (bf16_loss_diff, and the two "
                             "runs' tokens/s ratio)")
    parser.add_argument("--one", nargs=5, metavar=("PATH", "LENGTH", "CHECKPOINTING", "RELEASE", "PRECISION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps, args.data, args.one[2] == "1",
                             args.one[3] == "1", args.one[4])))
        return
    short, long = (int(x) for x in args.lengths.split(","))
    if args.curves_only:
        runs = {p: run_one(("a", short, 0, 0, p), args.curve_steps, args.data) for p in ("fp32", "bf16")}
        f, b = runs["fp32"]["losses"], runs["bf16"]["losses"]
        print(f"loss curves over {args.curve_steps} steps at {short} (fp32 | bf16): "
              + " ".join(f"{x:.3f}|{y:.3f}" for x, y in zip(f, b)))
        print(f"RESULT bf16_loss_diff={sum(abs(y - x) / x for x, y in zip(f, b)) / len(f):.4f} "
              f"bf16_speedup_{short}_curve_runs={runs['bf16']['tokens_per_s'] / runs['fp32']['tokens_per_s']:.2f}")
        return
    peak = matmul_peak_flops()
    # (path, tokens, gradient checkpointing, freed memory returned to the OS, precision)
    plan = [("a", short, 0, 0, "fp32"), ("b", short, 0, 0, "fp32"), ("c", short, 0, 0, "fp32"),
            ("a", long, 0, 0, "fp32"), ("c", long, 0, 0, "fp32"), ("a", long, 1, 0, "fp32"), ("c", long, 1, 0, "fp32"),
            ("a", long, 1, 1, "fp32"), ("c", long, 1, 1, "fp32"), ("z", short, 0, 0, "fp32"),
            ("zd", short, 0, 0, "fp32"), ("a", short, 0, 0, "bf16"), ("z", short, 0, 0, "bf16"),
            ("zd", short, 0, 0, "bf16"), ("a", long, 0, 0, "bf16")]
    rows = {}

    def run(key: tuple, steps: int) -> dict:
        return run_one(key, steps, args.data)

    for key in plan:
        path, length, gc, release, precision = key
        rows[key] = r = run(key, args.steps)
        name = PATHS[path] + (" +ckpt" if gc else "") + (" +release" if release else "") + f" {precision}"
        print(f"{name:>30} {length:>5} tok | {r['seconds_per_step']:6.2f} s/step | {r['tokens_per_s']:7.1f} tok/s | "
              f"{r['answers_per_s']:6.2f} answers/s ({r['answers_per_step']:.0f}/step) | "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (+{r['peak_over_model_mb']:5.0f} MB over loaded model) | "
              f"MFU {r['flops_per_s'] / peak:.3f}", flush=True)
    print(f"fp32 matmul peak (2048^3): {peak / 1e9:.0f} GFLOP/s")
    # the loss curves: same sequences, same LoRA initialisation, fp32 vs bf16 autocast
    curves = {precision: run(("a", short, 0, 0, precision), args.curve_steps)["losses"]
              for precision in ("fp32", "bf16")}
    loss_diff = sum(abs(b - f) / f for f, b in zip(curves["fp32"], curves["bf16"])) / args.curve_steps
    print(f"loss curves over {args.curve_steps} steps at {short} (fp32 | bf16): "
          + " ".join(f"{f:.3f}|{b:.3f}" for f, b in zip(curves["fp32"], curves["bf16"])))

    def ratio(a: tuple, c: tuple, field: str) -> float:
        return rows[a][field] / rows[c][field]

    f32 = lambda path, length, gc=0, release=0: (path, length, gc, release, "fp32")  # noqa: E731
    b16 = lambda path, length: (path, length, 0, 0, "bf16")  # noqa: E731
    print(f"peak RSS (a)/(c) at {long}: {ratio(f32('a', long), f32('c', long), 'peak_rss_mb'):.3f} plain, "
          f"{ratio(f32('a', long, 1), f32('c', long, 1), 'peak_rss_mb'):.3f} checkpointed, "
          f"{ratio(f32('a', long, 1, 1), f32('c', long, 1, 1), 'peak_rss_mb'):.3f} checkpointed + release "
          "(as manyicl trains)")
    print(f"tokens/s (a)/(c): {ratio(f32('a', short), f32('c', short), 'tokens_per_s'):.3f} at {short}, "
          f"{ratio(f32('a', long), f32('c', long), 'tokens_per_s'):.3f} at {long}, "
          f"{ratio(f32('a', long, 1, 1), f32('c', long, 1, 1), 'tokens_per_s'):.3f} at {long} checkpointed + release")
    for name, key in (("fp32", f32), ("bf16", b16)):
        print(f"packed zero-shot tokens/s / many_shot_all tokens/s at {short} ({name}): "
              f"{ratio(key('z', short), key('a', short), 'tokens_per_s'):.3f} per-unit attention, "
              f"{ratio(key('zd', short), key('a', short), 'tokens_per_s'):.3f} dense block mask")
    print(
        f"RESULT answers_per_s_ratio={ratio(f32('a', short), f32('b', short), 'answers_per_s'):.2f} "
        f"peak_mem_ratio_{long}={ratio(f32('a', long, 1, 1), f32('c', long, 1, 1), 'peak_rss_mb'):.3f} "
        f"tokens_per_s_ratio={ratio(f32('a', long), f32('c', long), 'tokens_per_s'):.3f} "
        f"mfu={rows[f32('a', long)]['flops_per_s'] / peak:.3f} "
        f"bf16_speedup_{short}={ratio(b16('a', short), f32('a', short), 'tokens_per_s'):.2f} "
        f"bf16_speedup_{long}={ratio(b16('a', long), f32('a', long), 'tokens_per_s'):.2f} "
        f"bf16_loss_diff={loss_diff:.4f} packed_ratio={ratio(f32('z', short), f32('a', short), 'tokens_per_s'):.3f}"
    )


if __name__ == "__main__":
    main()
