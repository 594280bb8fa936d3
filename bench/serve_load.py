"""`manyicl serve` under load on the embedded default, every comparison side by side in ONE run.

The task: sst2 (shared/data), its first --pool train examples registered as demonstrations, --shots of them in
the prompt (seed 0, labels balanced, room for 256 query tokens: the server's defaults), context --max-tokens.
The queries: the first --queries test inputs, one input per request (the hard case for a server: no client
batching; the worker merges what arrives together).

- offline: the evaluator in this process (``PromptedTask.answer``, what ``manyicl predict`` runs) on the same
  demonstrations and queries: queries/s of the whole cell, and with its one prefix pass taken out (the steady
  state a server with the prefix cached can reach; served_vs_offline_qps divides by this stricter one).
- served: ``manyicl serve`` in its own process; 1 client sending the queries one after another (p50), then
  --clients concurrent loopback clients (httpx, asyncio) over the same queries, --rounds times (qps, p99).
  Every served prediction is compared with the offline one (identical).
- naive: the same server with ``--cache-mb 0`` (every request encodes the task's prefix), 1 client,
  --naive-requests requests. served_vs_naive: 1-client qps cached / 1-client qps naive.
- llama.cpp (if ``llama_cpp`` imports, built from llama-cpp-python's source distribution): its OpenAI-style server
  (``python -m llama_cpp.server``; the prompt's common prefix with the last one reused) on the SAME GGUF file the
  embedded model is converted from (its Q4_1 weights: what a llama.cpp user runs), the same prompt text, one token
  of completion with its top-20 log-probabilities: the prediction is the label whose first token scores highest.
  1 client and --clients clients as above. llama_cpp_qps_ratio: served qps / llama.cpp qps, both at --clients clients.

Intervals: p50/p99 by bootstrap over requests (95 %); qps as the mean of the rounds with their range; accuracies
with a 95 % bootstrap interval. The clients share the 2 cores with the server, so what is measured is the
whole loopback system, as a user would measure it.

    python bench/serve_load.py [--queries 128] [--clients 16] [--rounds 3] [--shots 256] [--max-tokens 8192]
                               [--naive-requests 6] [--no-llama-cpp]

Last line:
    RESULT served_vs_offline_qps=… served_vs_naive=… p50_ms_single=… p99_ms_16=… [llama_cpp_qps_ratio=…]
    identical=…
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], health: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    """A server process, waited for until ``health`` answers 200 (its output goes to ``log``)."""
    import httpx

    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[2:4]}: the server ended; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    process.wait()
    raise SystemExit(f"{command[2:4]}: no answer from {health} in {timeout:.0f} s; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def bootstrap(values: list[float], statistic, seed: int = 0, draws: int = 2000) -> tuple[float, float, float]:
    """(statistic, 95 % low, 95 % high) over resampled requests."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boot = [statistic(x[rng.integers(0, len(x), len(x))]) for _ in range(draws)]
    return float(statistic(x)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def p50(x: np.ndarray) -> float:
    return float(np.percentile(x, 50))


def p99(x: np.ndarray) -> float:
    return float(np.percentile(x, 99))


def accuracy(predictions: list[str], golds: list[str]) -> str:
    value, low, high = bootstrap([float(p == g) for p, g in zip(predictions, golds)], np.mean)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


async def load(post, queries: list[str], clients: int) -> tuple[float, list[float], list[str]]:
    """``clients`` concurrent clients taking the queries in turn, one per request: (wall s, latencies ms,
    predictions in query order)."""
    next_query = iter(range(len(queries)))
    latencies: list[float] = [0.0] * len(queries)
    predictions: list[str] = [""] * len(queries)

    async def client() -> None:
        for i in next_query:  # one shared iterator: each query is sent once
            begin = time.perf_counter()
            predictions[i] = await post(queries[i])
            latencies[i] = (time.perf_counter() - begin) * 1000

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - begin, latencies, predictions


def measure(name: str, post_factory, queries: list[str], clients: int, rounds: int, single: int) -> dict:
    """1 client over ``single`` queries, then ``clients`` clients over all of them, ``rounds`` times."""
    import httpx

    async def run() -> dict:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
            post = post_factory(http)
            await post(queries[0])  # warm: the prefix encoded (a miss) before anything is timed
            wall1, lat1, pred1 = await load(post, queries[:single], 1)
            out = {"qps_1": single / wall1, "lat_1": lat1, "pred_1": pred1}
            if clients and rounds:
                walls, lats = [], []
                for _ in range(rounds):
                    wall, lat, pred = await load(post, queries, clients)
                    walls.append(wall)
                    lats += lat
                out |= {"qps_n": [len(queries) / w for w in walls], "lat_n": lats, "pred_n": pred}
            return out

    result = asyncio.run(run())
    line = f"{name}: 1 client {result['qps_1']:.2f} q/s, p50 %.0f ms [%.0f, %.0f]" % bootstrap(result["lat_1"], p50)
    if "qps_n" in result:
        q = result["qps_n"]
        line += (f"; {clients} clients {np.mean(q):.2f} q/s (rounds {min(q):.2f}-{max(q):.2f}), "
                 "p50 %.0f ms, " % p50(np.asarray(result["lat_n"]))
                 + "p99 %.0f ms [%.0f, %.0f]" % bootstrap(result["lat_n"], p99))
    print(line, flush=True)
    return result


def manyicl_post(url: str, task: str):
    def factory(http):
        async def post(text: str) -> str:
            r = await http.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": [text]})
            r.raise_for_status()
            return r.json()["predictions"][0]["prediction"]
        return post
    return factory


def serve_manyicl(args, spec: dict, queries: list[str], work: Path, cache_mb: float, label: str,
                  clients: int, rounds: int, single: int) -> tuple[dict, dict]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start([sys.executable, "-m", "manyicl.cli", "serve", "--port", str(port), "--cache-mb", str(cache_mb),
                     "--max-tokens", str(args.max_tokens), "--max-queue", "256"], url + "/healthz",
                    work / f"{label}.log")
    try:
        begin = time.perf_counter()
        r = httpx.post(url + "/v1/tasks", json=spec, timeout=3600)
        r.raise_for_status()
        task = r.json()
        print(f"{label}: registered in {time.perf_counter() - begin:.1f} s: {task['shots']} demonstrations, "
              f"{task['prefix_tokens']} prefix tokens, labels {task['label_histogram']}", flush=True)
        return task, measure(label, manyicl_post(url, spec["name"]), queries, clients, rounds, single)
    finally:
        stop(process)


def offline(args, spec: dict, queries: list) -> dict:
    """The evaluator in this process on the same task: (predictions, qps with and without the prefix pass)."""
    import torch

    from manyicl.evaluation import hf_backend
    from manyicl.models import for_inference, load_model, load_tokenizer
    from manyicl.predict import PromptedTask, prompt_task
    from manyicl.serving.schemas import TaskSpec
    from manyicl.serving.worker import demonstrations_of

    spec = TaskSpec(**spec)
    tokenizer = load_tokenizer("smollm2-135m")
    model = for_inference(load_model("smollm2-135m"))
    task = prompt_task(spec.family, demonstrations_of(spec), spec.labels)
    prompted = PromptedTask.build(task, tokenizer, spec.shots, spec.seed, spec.scoring, args.max_tokens,
                                  spec.balance_labels, spec.query_tokens)
    backend = hf_backend(model, tokenizer, args.max_tokens)
    prefix = prompted.prefix
    with torch.inference_mode():
        backend.encode_prefix(prefix)  # warm
        begin = time.perf_counter()
        backend.encode_prefix(prefix)
        prefix_s = time.perf_counter() - begin
        begin = time.perf_counter()
        out = prompted.answer(backend, queries)
        cell_s = time.perf_counter() - begin
    n = len(queries)
    print(f"offline: {len(prompted.demonstrations)} demonstrations, {len(prefix)} prefix tokens; the cell "
          f"{cell_s:.1f} s = {n / cell_s:.2f} q/s; its prefix pass {prefix_s:.1f} s; without it "
          f"{n / (cell_s - prefix_s):.2f} q/s", flush=True)
    text = tokenizer.decode(prefix)  # for llama.cpp: the same prompt as text
    encoded = [prompted.prompter.encode_query(prompted.prompter.context(prompted.demonstrations), q) for q in queries]
    labels, _ = prompted.prompter.candidates(queries[0])
    first_tokens = [c[0] for c in encoded[0].candidates]
    return {"predictions": [p.prediction for p in out.predictions], "qps_cell": n / cell_s,
            "qps": n / (cell_s - prefix_s), "prefix_text": text, "prefix_ids": prefix,
            "query_ids": [e.ids for e in encoded], "labels": labels,
            "first_pieces": [tokenizer.decode([t]) for t in first_tokens], "first_tokens": first_tokens}


def llama_cpp(args, off: dict, queries: list[str], work: Path) -> dict | None:
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama.cpp: not measured: llama_cpp does not import ({e}); pip install llama-cpp-python[server] "
              "builds it from source", flush=True)
        return None
    from manyicl.models import _embedded_gguf

    gguf = _embedded_gguf("smollm2-135m")
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    prompts = [off["prefix_text"] + vocab.detokenize(ids).decode() for ids in off["query_ids"]]
    # the same tokens as ours? llama.cpp tokenizes the text itself (with its BOS rule)
    same = sum(vocab.tokenize(p.encode(), add_bos=False, special=True) == off["prefix_ids"] + ids
               for p, ids in zip(prompts, off["query_ids"]))
    print(f"llama.cpp {llama_cpp.__version__}: {gguf.name}; prompts tokenized as ours: {same}/{len(prompts)}",
          flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # its prompt cache: the model keeps the last prompt's keys/values and evaluates only what follows the longest
    # common prefix (Llama.generate). --cache True would add a RAM cache of whole saved states, each holding the
    # logits of all 8K positions (logits_all, needed for logprobs): it grew past 16 GB here and was OOM-killed.
    process = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                     "--n_ctx", str(args.max_tokens), "--n_threads", str(os.cpu_count()), "--cache", "False",
                     "--logits_all", "True", "--verbose", "False"], url + "/v1/models", work / "llama_cpp.log")
    pieces = off["first_pieces"]
    missing = []
    by_prompt = dict(zip(queries, prompts))

    def factory(http):
        async def post(text: str) -> str:
            r = await http.post(url + "/v1/completions", json={
                "prompt": by_prompt[text], "max_tokens": 1, "temperature": 0, "logprobs": 20})
            r.raise_for_status()
            top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            scores = [top.get(piece, -float("inf")) for piece in pieces]
            if max(scores) == -float("inf"):
                missing.append(text)
            return off["labels"][int(np.argmax(scores))]
        return post

    try:
        result = measure("llama.cpp", factory, queries, args.clients, args.rounds, args.single)
    finally:
        stop(process)
    if missing:
        print(f"llama.cpp: {len(set(missing))} queries had no label's first token in its top 20 (scored as the "
              "first label)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--pool", type=int, default=1024, help="train examples registered as demonstrations")
    parser.add_argument("--shots", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--single", type=int, default=32, help="queries sent by the single client")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-requests", type=int, default=6)
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()

    from manyicl.task_files import read_examples

    data = Path(args.data) / "sst2"
    pool = read_examples(data / "train.jsonl")[: args.pool]
    queries = read_examples(data / "test.jsonl")[: args.queries]
    texts = [q.input for q in queries]
    golds = [q.output for q in queries]
    spec = {"name": "sst2", "family": "classification", "shots": args.shots, "seed": 0,
            "demonstrations": [{"input": e.input, "output": e.output} for e in pool]}
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    print(f"sst2: {len(pool)} demonstrations registered, {args.shots} shots, {len(queries)} queries, "
          f"{args.clients} clients x {args.rounds} rounds; logs in {work}", flush=True)

    off = offline(args, spec, queries)
    served_task, served = serve_manyicl(args, spec, texts, work, 2048, "served", args.clients, args.rounds,
                                        args.single)
    _, naive = serve_manyicl(args, spec, texts, work, 0, "naive (--cache-mb 0)", 0, 0, args.naive_requests)
    identical = (served["pred_1"] == off["predictions"][: args.single] and served["pred_n"] == off["predictions"]
                 and naive["pred_1"] == off["predictions"][: args.naive_requests])
    print(f"accuracy on {len(queries)} queries: offline {accuracy(off['predictions'], golds)}, served "
          f"{accuracy(served['pred_n'], golds)}; predictions served = offline: {identical}")
    result = {"served_vs_offline_qps": np.mean(served["qps_n"]) / off["qps"],
              "served_vs_naive": served["qps_1"] / naive["qps_1"],
              "p50_ms_single": p50(np.asarray(served["lat_1"])),
              f"p99_ms_{args.clients}": p99(np.asarray(served["lat_n"]))}
    print(f"served vs offline with its prefix pass: {np.mean(served['qps_n']) / off['qps_cell']:.2f}x")
    if not args.no_llama_cpp:
        cpp = llama_cpp(args, off, texts, work)
        if cpp:
            agree = np.mean([a == b for a, b in zip(cpp["pred_n"], off["predictions"])])
            print(f"llama.cpp accuracy {accuracy(cpp['pred_n'], golds)}; agrees with ours on {agree:.3f} of the "
                  "queries (its Q4_1 weights and first-token scoring against our dequantized weights and the "
                  "whole label's score)")
            result["llama_cpp_qps_ratio"] = np.mean(served["qps_n"]) / np.mean(cpp["qps_n"])
    (work / "result.json").write_text(json.dumps({"args": vars(args), "task": served_task,
                                                   **{k: float(v) for k, v in result.items()}}, indent=1))
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()) + f" identical={identical}")


if __name__ == "__main__":
    main()
