"""Evaluation throughput on the embedded default, every comparison side by side in ONE run.

- speedup_K: sst2 (shared/data), the first --queries test queries, seed 0, at K shots (256 is capped by the
  8K context; the count used is printed). The shared-prefix backend runs the whole cell (prefix once + every
  query); the naive backend (prefix re-encoded for every query) runs the first --naive-queries queries of the
  SAME cell. speedup = naive s/query / shared s/query (the prefix pass included, amortised over the cell; a
  ranked cell's two content-free calibration queries count as queries on both paths).
  Predictions and candidate log-probs of the common queries are compared (identical, |Δ| < 1e-4).
- floor_ratio_256: the 256-shot cell's wall time / its arithmetic floor: the FLOPs of the prefix pass and of
  every query and candidate token (linear layers, attention over the keys each token sees, the LM head where
  logits are taken), counted from the model's shapes, divided by the fp32 matmul rate measured in this run.
- gen_speedup_64: lama_P19 at 64 shots, 16 new tokens, shared vs naive (same protocol as above).
- lm_eval_ratio_128: lm-evaluation-harness (``pip install -e .[bench]``), HF backend on the SAME loaded model,
  sst2 from the same files through a local task YAML (its glue/sst2 prompt), 128 shots, --lm-eval-docs
  documents: its seconds per document / ours per query at 128 shots. Both accuracies are printed.
- grouped-query attention on the 256-shot group's shapes: transformers' repeat_kv, SDPA's enable_gqa (used),
  and folding the query heads into the sequence.
- peak RSS after the shared-prefix cells (before any naive 256-shot query), and at the end.

    python bench/eval_throughput.py [--queries 200] [--naive-queries 10] [--lm-eval-docs 5]

Last line:
    RESULT speedup_16=… speedup_64=… speedup_256=… floor_ratio_256=… gen_speedup_64=… lm_eval_ratio_128=… identical=…
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cell_flops(config, prefix: int, queries: list[list[int]], candidates: list[list[list[int]]]) -> float:
    """FLOPs of a shared-prefix cell at its floor: prefix pass + every query token + every trie token."""
    h, m, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    linear = 2 * n_layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * m)  # per token
    attention_per_key = 4 * n_layers * heads * d  # QK^T and AV, per (token, visible key)
    head = 2 * h * config.vocab_size  # per logit row
    flops = prefix * linear + attention_per_key * prefix * (prefix + 1) / 2 + head
    for q, cands in zip(queries, candidates):
        trie = {tuple(c[:t]) for c in cands for t in range(1, len(c))}
        depths = list(range(len(q))) + [len(q) - 1 + len(node) for node in trie]
        flops += len(depths) * linear + attention_per_key * sum(prefix + dep + 1 for dep in depths)
        flops += (1 + len(trie)) * head
    return flops


def run_lm_eval(model, tokenizer, data: Path, shots: int, docs: int) -> tuple[float, float]:
    """lm-evaluation-harness on the same model: (seconds per document, accuracy)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from prompt_vs_lm_eval import sst2_task_manager  # the same task YAML (bench/ is on sys.path when run as a script)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=8192)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["manyicl_sst2"], num_fewshot=shots, limit=docs,
                                  task_manager=sst2_task_manager(data / "sst2" / "train.jsonl",
                                                                 data / "sst2" / "test.jsonl"),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - start
    return seconds / docs, out["results"]["manyicl_sst2"]["acc,none"]


def gqa_timings(group_tokens: int, keys: int, heads: int, kv_heads: int, dim: int) -> dict[str, float]:
    """ms per attention call on one layer's shapes: repeat_kv vs enable_gqa vs query heads folded."""
    import torch
    import torch.nn.functional as F

    n_rep = heads // kv_heads
    q, k, v = (torch.randn(1, heads, group_tokens, dim), torch.randn(1, kv_heads, keys, dim),
               torch.randn(1, kv_heads, keys, dim))
    mask = torch.zeros(1, 1, group_tokens, keys)
    mask[..., keys - group_tokens :] = torch.triu(torch.full((group_tokens, group_tokens), float("-inf")), 1)
    folded_mask = mask.repeat(1, 1, n_rep, 1)

    def repeat(x):
        return x[:, :, None].expand(1, kv_heads, n_rep, keys, dim).reshape(1, heads, keys, dim)

    ways = {
        "repeat_kv": lambda: F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask),
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "fold": lambda: F.scaled_dot_product_attention(q.reshape(1, kv_heads, n_rep * group_tokens, dim), k, v,
                                                       attn_mask=folded_mask).reshape(1, heads, group_tokens, dim),
    }
    reference = ways["repeat_kv"]()
    assert all(torch.allclose(f(), reference, atol=1e-5) for f in ways.values())
    total = dict.fromkeys(ways, 0.0)
    for _ in range(5):  # interleaved, so drift in machine load hits every way alike
        for name, f in ways.items():
            start = time.perf_counter()
            f()
            total[name] += (time.perf_counter() - start) / 5 * 1000
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--naive-queries", type=int, default=10)
    parser.add_argument("--shots", default="16,64,256")
    parser.add_argument("--gen-queries", type=int, default=100)
    parser.add_argument("--lm-eval-docs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()

    import torch

    from manyicl.evaluation import NaiveBackend, Prompter, SharedPrefixBackend, evaluate_cell
    from manyicl.evaluation.prompting import CONTENT_FREE_INPUTS
    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.task_files import load_task_dir
    from matmul_peak import gflops  # the same rate bench/matmul_peak.py prints (bench/ is on sys.path as a script)

    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m").eval()
    shared = SharedPrefixBackend(model, tokenizer, args.batch_tokens)
    naive = NaiveBackend(model, tokenizer, args.batch_tokens)
    rate = gflops(torch.float32)
    print(f"fp32 matmul: {rate:.0f} GFLOP/s; torch threads: {torch.get_num_threads()}")

    def both(task_name: str, shots: int, n_queries: int, max_new_tokens: int | None = None):
        task = load_task_dir(Path(args.data) / task_name)
        queries = task.test[:n_queries]
        prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), args.max_tokens, max_new_tokens)
        demos = prompter.choose_demonstrations(shots, 0, False, queries)
        fast = evaluate_cell(shared, prompter, demos, queries)
        return task, prompter, demos, queries, fast

    def compare(name, fast, slow, n_fast):
        # per scored prompt: a ranked cell also scores the content-free calibration queries, on both paths
        extra = len(CONTENT_FREE_INPUTS) if fast.predictions[0].scores else 0
        fast_per_query, slow_per_query = fast.seconds / (n_fast + extra), slow.seconds / (len(slow.predictions) + extra)
        subset = fast.predictions[: len(slow.predictions)]
        same = [a.prediction for a in subset] == [b.prediction for b in slow.predictions]
        delta = max((abs(a.scores[s][k] - b.scores[s][k]) for a, b in zip(subset, slow.predictions) if a.scores
                     for s in a.scores for k in a.scores[s]), default=0.0)
        print(f"{name:<14} {fast.shots:>5} {fast.prefix_tokens:>7} | {fast.seconds:>8.1f}s {fast_per_query:>8.3f} "
              f"{fast.metrics['value']:>6.3f} | {slow.seconds:>8.1f}s {slow_per_query:>8.3f} | "
              f"{slow_per_query / fast_per_query:>7.1f}x | {str(same):>5} | {delta:.1e}", flush=True)
        return slow_per_query / fast_per_query, same and delta < 1e-4

    header = (f"{'cell':<14} {'shots':>5} {'prefix':>7} | {'shared':>9} {'s/query':>8} {'metric':>6} | "
              f"{'naive':>9} {'s/query':>8} | {'speedup':>8} | same  | max |Δ log-prob|")
    print(header)
    speedups, identical, floor_ratio, fast_cells = {}, True, float("nan"), {}
    shot_list = [int(k) for k in args.shots.split(",")]
    for shots in sorted(set(shot_list) | {128}):  # shared path first at every count (peak memory is read after)
        fast_cells[shots] = both("sst2", shots, args.queries)
    rss_shared = peak_rss_mb()
    for shots in shot_list:
        task, prompter, demos, queries, fast = fast_cells[shots]
        prompter.calibration.clear()  # the naive path measures its own content-free scores
        slow = evaluate_cell(naive, prompter, demos, queries[: args.naive_queries])
        speedups[shots], ok = compare(f"sst2@{shots}", fast, slow, len(queries))
        identical &= ok
        if shots == 256:
            prefix = prompter.prefix_ids(demos)
            encoded = [prompter.encode_query(prompter.context(demos), q) for q in queries]
            flops = cell_flops(model.config, len(prefix), [e.ids for e in encoded], [e.candidates for e in encoded])
            floor_ratio = fast.seconds / (flops / rate / 1e9)
            print(f"  256-shot cell: {flops / 1e12:.2f} TFLOP -> floor {flops / rate / 1e9:.1f} s "
                  f"at {rate:.0f} GFLOP/s; wall {fast.seconds:.1f} s; floor ratio {floor_ratio:.2f}; "
                  f"peak RSS {rss_shared:.0f} MB (shared cells)")
            group = args.batch_tokens
            print("  grouped-query attention, one layer, %d group tokens over %d keys (ms): %s" % (
                group, len(prefix) + group, ", ".join(f"{k} {v:.0f}" for k, v in gqa_timings(
                    group, len(prefix) + group, model.config.num_attention_heads, model.config.num_key_value_heads,
                    model.config.head_dim).items())))

    task, prompter, demos, queries, fast = both("lama_P19", 64, args.gen_queries, max_new_tokens=16)
    prompter.calibration.clear()  # the naive path measures its own content-free scores
    slow = evaluate_cell(naive, prompter, demos, queries[: args.naive_queries])
    gen_speedup, ok = compare("lama_P19@64", fast, slow, len(queries))
    identical &= ok

    lm_eval_ratio = float("nan")
    if importlib.util.find_spec("lm_eval") is None:
        print("lm-evaluation-harness is not installed (pip install -e .[bench]): its comparison is skipped")
    else:
        fast = fast_cells[128][4]
        per_doc, accuracy = run_lm_eval(model, tokenizer, Path(args.data), 128, args.lm_eval_docs)
        ours = fast.seconds / len(fast.predictions)
        lm_eval_ratio = per_doc / ours
        print(f"lm-eval sst2@128: {per_doc:.2f} s/document, accuracy {accuracy:.3f} on {args.lm_eval_docs} documents | "
              f"manyicl sst2@{fast.shots}: {ours:.3f} s/query, accuracy {fast.metrics['value']:.3f} "
              f"on {len(fast.predictions)} queries | ratio {lm_eval_ratio:.1f}x")
    print(f"peak RSS at the end: {peak_rss_mb():.0f} MB")
    print("RESULT " + " ".join(f"speedup_{k}={v:.1f}" for k, v in speedups.items())
          + f" floor_ratio_256={floor_ratio:.2f} gen_speedup_64={gen_speedup:.1f} lm_eval_ratio_128={lm_eval_ratio:.1f}"
          + f" identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
