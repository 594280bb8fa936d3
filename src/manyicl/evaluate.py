"""Many-shot in-context evaluation with a shared-prefix key/value cache.

For one (task, shots, seed) cell the demonstrations are the same for every query, so the prefix
``header + demonstrations`` is run through the model ONCE; its key/value cache is reused for every query
(cropped back to the prefix after each one). Label-set families rank their candidate answers by
log-likelihood, all candidates batched on the cached prefix; the other families decode greedily until the
end-of-answer delimiter. ``prefix_cache=False`` runs the naive path (prefix recomputed per query) for checks.

Prompts come from the same Formatter as training, and answers are tokenized in context exactly as the
training targets were (answer + delimiter + the opening of a next example).
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from manyicl.errors import ManyICLError
from manyicl.files import write_atomic
from manyicl.formatter import Formatter
from manyicl.metrics import score, split_labels
from manyicl.sequences import SequenceBuilder, leading_special_ids, tokenize_spans
from manyicl.tasks import RANKED_FAMILIES, Example, Task

MAX_NEW_TOKENS = {"qa": 32, "math": 16, "summarization": 96, "generation": 64, "multilabel": 32}


@dataclass
class Prediction:
    input: str
    prediction: str
    golds: tuple[str, ...]
    scores: dict[str, float] | None = None  # candidate -> log-likelihood (ranked families)
    skipped: bool = False  # the query alone overflows the context


@dataclass
class CellOutput:
    shots: int  # demonstrations actually used
    prefix_tokens: int
    predictions: list[Prediction]
    seconds: float
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- cache helpers


def _plain_dynamic(cache: Any) -> bool:
    """Exactly DynamicLayer everywhere (no sliding-window or other subclass), whose crop() is exact."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _batched_view(cache: Any, n: int) -> Any:
    """A copy of ``cache`` for a batch of n whose tensors are expanded views: no copy of the prefix is made."""
    memo: dict[int, Any] = {}
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            memo[id(layer.keys)] = layer.keys.expand(n, *layer.keys.shape[1:])
            memo[id(layer.values)] = layer.values.expand(n, *layer.values.shape[1:])
    return copy.deepcopy(cache, memo)


class PrefixCache:
    """The demonstrations' key/value cache, restored to the prefix after every query."""

    def __init__(self, model: Any, prefix_ids: list[int]):
        self.model, self.length = model, len(prefix_ids)
        self.cache = None
        if prefix_ids:
            out = model(input_ids=torch.tensor([prefix_ids]), use_cache=True, logits_to_keep=1)  # only the cache is needed
            self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        # crop() is exact for plain dynamic layers; other cache types get a pristine copy per query
        self._pristine = None if self.cache is None or _plain_dynamic(self.cache) else copy.deepcopy(self.cache)

    def fresh(self) -> Any:
        if self.cache is None:
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        if self._pristine is not None:
            return copy.deepcopy(self._pristine)
        extra = self.cache.get_seq_length() - self.length
        if extra:
            self.cache.crop(-extra)
        return self.cache


def _forward(model: Any, ids: torch.Tensor, cache: Any, last_only: bool = True) -> tuple[torch.Tensor, Any]:
    """One step on top of ``cache``; ``last_only`` skips the LM head (49K-wide for SmolLM2) on earlier positions."""
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
    return out.logits, (out.cache if hasattr(out, "cache") else out.past_key_values)


# ---------------------------------------------------------------- one cell


class CellEvaluator:
    """Evaluates queries of one task against one set of demonstrations."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        formatter: Formatter,
        max_tokens: int,
        prefix_cache: bool = True,
        length_normalize: bool = False,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
    ):
        self.model, self.tokenizer, self.task, self.formatter = model, tokenizer, task, formatter
        self.max_tokens, self.use_cache = max_tokens, prefix_cache
        self.length_normalize, self.batch_size = length_normalize, batch_size
        self.ranked = task.family in RANKED_FAMILIES
        self.labels = tuple(task.labels or ())
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS.get(task.family, 64)
        self.lead = leading_special_ids(tokenizer)
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}

    # ---- tokenization in context
    def encode_query(self, context: str, query: str, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the query prompt and of each candidate answer as they appear after ``context``."""
        prompt = self.formatter.prompt(query)
        answers = [self.formatter.answer(c) for c in candidates] or [""]
        texts, spans = [], []
        for a in answers:
            start = len(context)
            texts.append(context + prompt + a + self.formatter.continuation)
            spans.append([(start, start + len(prompt)), (start + len(prompt), start + len(prompt) + len(a))] if a else [(start, start + len(prompt))])
        query_ids, cand_ids = None, []
        for text, sp in zip(texts, spans):
            ids, tspans = tokenize_spans(self.tokenizer, text, sp)
            q = ids[tspans[0][0] : tspans[0][1]]
            if query_ids is not None and q != query_ids:
                raise ManyICLError(f"task {self.task.name}: the query tokenizes differently before different answers; change the template")
            query_ids = q
            if len(tspans) > 1:
                cand_ids.append(ids[tspans[1][0] : tspans[1][1]])
        return query_ids, cand_ids

    def query_budget(self, query_ids: list[int], cand_ids: list[list[int]]) -> int:
        answer = max((len(c) for c in cand_ids), default=0) if self.ranked else self.max_new_tokens
        return len(query_ids) + answer

    def choose_demonstrations(self, shots: int | str, seed: int, balance: bool, queries: list[Example]) -> list[Example]:
        """The first ``shots`` examples of the seeded order that fit next to the longest query."""
        builder = SequenceBuilder(self.task, self.tokenizer, self.formatter, self.max_tokens, "many_shot_all", balance_labels=balance)
        check_shots(self.task, shots)
        order = builder.order(random.Random(f"eval:{self.task.name}:{seed}"))
        wanted = order if shots == "max" else order[:shots]
        reserve = 0
        for q in queries:
            qi, ci = self.encode_query("", q.input, list(self.labels) if self.ranked else [])
            need = self.query_budget(qi, ci)
            if need + len(self.lead) <= self.max_tokens:
                reserve = max(reserve, need)
        header = self.tokenizer(self.formatter.header, add_special_tokens=False)["input_ids"]
        chosen = builder.take_fitting(wanted, self.max_tokens - reserve - len(self.lead) - len(header))
        # token counts of separate examples can differ slightly in context: trim until the prefix really fits
        while chosen and len(self.prefix_ids(chosen)) > self.max_tokens - reserve:
            chosen.pop()
        if shots != "max" and len(chosen) < shots:
            warnings.warn(f"{self.task.name}: only {len(chosen)} of {shots} demonstrations fit in {self.max_tokens} tokens", stacklevel=2)
        return chosen

    def prefix_ids(self, demos: list[Example]) -> list[int]:
        rendered = self.formatter.render(demos)  # ends with the continuation: the last delimiter tokenizes as in training
        prefix_len = len(rendered.text) - len(self.formatter.continuation)
        if prefix_len == 0:
            return list(self.lead)
        ids, spans = tokenize_spans(self.tokenizer, rendered.text, [(0, prefix_len)], self.lead)
        return ids[: spans[0][1]]

    # ---- running
    @torch.inference_mode()
    def run(self, demos: list[Example], queries: list[Example]) -> CellOutput:
        start = time.perf_counter()
        rendered = self.formatter.render(demos)
        prefix_text = rendered.text[: len(rendered.text) - len(self.formatter.continuation)]
        # the context that decides how the query tokenizes: the last demonstration (or the header)
        context = prefix_text[rendered.example_spans[-1][0] :] if demos else prefix_text
        prefix_ids = self.prefix_ids(demos)
        cache = PrefixCache(self.model, prefix_ids) if self.use_cache else None
        predictions, skipped = [], 0
        for n, q in enumerate(queries):
            query_ids, cand_ids = self.encode_query(context, q.input, list(self.labels) if self.ranked else [])
            if n == 0:
                self._check_in_context(prefix_text, q, prefix_ids, query_ids, cand_ids)
            if len(prefix_ids) + self.query_budget(query_ids, cand_ids) > self.max_tokens:
                predictions.append(Prediction(q.input, "", q.golds, skipped=True))
                skipped += 1
                continue
            if self.ranked:
                scores = self._rank(cache, prefix_ids, query_ids, cand_ids)
                best = max(range(len(self.labels)), key=lambda i: scores[i])
                predictions.append(Prediction(q.input, self.labels[best], q.golds, dict(zip(self.labels, scores))))
            else:
                text = self._generate(cache, prefix_ids, query_ids)
                if self.task.family == "multilabel":
                    text = ", ".join(l for l in split_labels(text) if l in self.labels)
                predictions.append(Prediction(q.input, text, q.golds))
        if skipped:
            warnings.warn(f"{self.task.name}: {skipped} queries skipped: each alone overflows {self.max_tokens} tokens", stacklevel=2)
        kept = [p for p in predictions if not p.skipped]
        metrics = score(self.task.metric, [p.prediction for p in kept], [p.golds for p in kept]) if kept else {"value": float("nan")}
        return CellOutput(len(demos), len(prefix_ids), predictions, time.perf_counter() - start, skipped, metrics)

    def _check_in_context(self, prefix_text: str, q: Example, prefix_ids, query_ids, cand_ids) -> None:
        """Once per cell: cached pieces must equal tokenizing the whole prompt at once."""
        answer = self.formatter.answer(self.labels[0]) if self.ranked and self.labels else ""
        full = self.tokenizer(prefix_text + self.formatter.prompt(q.input) + answer + self.formatter.continuation,
                              add_special_tokens=False)["input_ids"]
        pieces = prefix_ids[len(self.lead) :] + query_ids + (cand_ids[0] if answer else [])
        if full[: len(pieces)] != pieces:
            raise ManyICLError(f"task {self.task.name}: prefix and query do not tokenize as the full prompt; change the template")

    def _rank(self, cache: PrefixCache | None, prefix_ids, query_ids, cand_ids) -> list[float]:
        """log P(candidate answer + delimiter | prefix, query) for every candidate."""
        scores: list[float] = []
        if cache is not None:
            past = cache.fresh()
            logits, past = _forward(self.model, torch.tensor([query_ids]), past)
            first = torch.log_softmax(logits[0, -1].float(), -1)
            for chunk in range(0, len(cand_ids), self.batch_size):
                group = cand_ids[chunk : chunk + self.batch_size]
                width = max(len(c) for c in group) - 1
                rest = None
                if width > 0:  # continue every candidate on a view of the query cache: no prefix copy
                    view = _batched_view(past, len(group))
                    ids = torch.tensor([c[:-1] + [c[-1]] * (width - len(c) + 1) for c in group])
                    rest = torch.log_softmax(_forward(self.model, ids, view, last_only=False)[0].float(), -1)
                for k, c in enumerate(group):
                    lp = first[c[0]].item() + sum(rest[k, t - 1, c[t]].item() for t in range(1, len(c)))
                    scores.append(lp / len(c) if self.length_normalize else lp)
            return scores
        # naive: every candidate re-reads prefix + query; logits only where candidate tokens are predicted
        base = prefix_ids + query_ids
        for chunk in range(0, len(cand_ids), self.batch_size):
            group = cand_ids[chunk : chunk + self.batch_size]
            width = len(base) + max(len(c) for c in group)
            ids = torch.tensor([base + c + [c[-1]] * (width - len(base) - len(c)) for c in group])
            keep = torch.zeros_like(ids, dtype=torch.bool)
            for k, c in enumerate(group):
                keep[k, len(base) - 1 : len(base) - 1 + len(c)] = True
            logp = torch.log_softmax(self.model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits.float(), -1)
            pos = 0
            for c in group:
                lp = sum(logp[pos + t, c[t]].item() for t in range(len(c)))
                pos += len(c)
                scores.append(lp / len(c) if self.length_normalize else lp)
        return scores

    def _generate(self, cache: PrefixCache | None, prefix_ids, query_ids) -> str:
        """Greedy decoding until the end-of-answer delimiter (or EOS, or max_new_tokens)."""
        if cache is not None:
            logits, past = _forward(self.model, torch.tensor([query_ids]), cache.fresh())
        else:
            logits, past = _forward(self.model, torch.tensor([prefix_ids + query_ids]), None)
        generated: list[int] = []
        for _ in range(self.max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token in self.stop_ids:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            if self.formatter.delimiter and self.formatter.delimiter in text:
                break
            logits, past = _forward(self.model, torch.tensor([[token]]), past)
        return self.formatter.strip_answer(self.tokenizer.decode(generated))


def check_shots(task: Task, shots: int | str) -> None:
    if shots != "max" and shots > len(task.train):
        raise ManyICLError(f"task {task.name}: shots={shots} is larger than its train split ({len(task.train)} examples); lower it")


def check_golds(task: Task, queries: list[Example], labels: tuple[str, ...]) -> None:
    """Before any work: every gold of a ranked task must be a candidate, or accuracy is silently capped."""
    if task.family not in RANKED_FAMILIES:
        return
    for q in queries:
        if q.output not in labels:
            where = q.source or task.name
            raise ManyICLError(f"{where}: gold label {q.output!r} is not in the label set {list(labels)}; add it to task.yaml labels")


# ---------------------------------------------------------------- the runner: cells -> results.json


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ManyICLError(f"{path}: not valid JSON; move it away to start the evaluation again") from None


def cell_key(r: dict) -> tuple:
    return (r["method"], r["model"], r.get("adapter"), r["task"], str(r["shots_requested"]), r["seed"])


def run_evaluation(
    config: Any,
    tasks: list[tuple[Task, str]],
    method: str = "base",
    adapter: str | None = None,
    output_dir: str | Path | None = None,
    loaded: tuple[Any, Any] | None = None,
    shots: list[Any] | None = None,
) -> list[dict]:
    """Evaluate every (task, shots, seed) cell not already in ``<output_dir>/results.json``.

    ``tasks`` pairs each task with its role ("held_out" or "forgetting"). Results are appended cell by cell,
    so an interrupted run loses nothing and a rerun skips the cells that are done.
    """
    from tqdm.auto import tqdm

    from manyicl.models import load_model, load_tokenizer

    ev = config.evaluation
    out = Path(output_dir or config.output_dir)
    results_path = out / "results.json"
    results = load_results(results_path)
    done = {cell_key(r) for r in results}
    max_tokens = ev.max_tokens or config.training.max_tokens
    model_name = config.model.name

    # plan and validate everything before any model work or any write
    cells = []
    for task, role in tasks:
        queries = task.test[: ev.max_queries] if ev.max_queries else task.test
        if not queries:
            raise ManyICLError(f"task {task.name}: no test examples to evaluate; add a test.jsonl")
        check_golds(task, queries, tuple(task.labels or ()))
        for k in (shots or ev.shots) if role == "held_out" else ev.forgetting_shots:
            check_shots(task, k)
            for seed in ev.seeds:
                key = (method, model_name, adapter, task.name, str(k), seed)
                if key not in done:
                    cells.append((task, role, queries, k, seed))
    if not cells:
        return results

    model, tokenizer = loaded or (None, None)
    if model is None:
        tokenizer = load_tokenizer(model_name, config.model.trust_remote_code)
        model = load_model(model_name, config.model.trust_remote_code, adapter=adapter)
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_tokens > context:
        raise ManyICLError(f"evaluation.max_tokens={max_tokens} exceeds the model's context length ({context}); lower it")

    for task, role, queries, k, seed in tqdm(cells, desc=f"eval {method}", unit="cell", dynamic_ncols=True):
        formatter = Formatter.for_task(task, tokenizer, chat=config.format.chat, **config.format.template)
        evaluator = CellEvaluator(
            model, tokenizer, task, formatter, max_tokens, ev.prefix_cache, ev.length_normalize, ev.batch_size,
            ev.max_new_tokens.get(task.family),
        )
        demos = evaluator.choose_demonstrations(k, seed, ev.balance_labels, queries)
        output = evaluator.run(demos, queries)
        stem = f"{method}/{task.name}_shots{k}_seed{seed}"
        write_atomic(out / "predictions" / f"{stem}.jsonl", "".join(
            json.dumps({"input": p.input, "prediction": p.prediction, "golds": list(p.golds), "skipped": p.skipped,
                        **({"scores": p.scores} if p.scores else {})}, ensure_ascii=False) + "\n"
            for p in output.predictions
        ))
        record = {
            "model": model_name, "adapter": adapter, "method": method, "role": role, "task": task.name,
            "family": task.family, "metric": task.metric, "shots": output.shots, "shots_requested": k, "seed": seed,
            "value": output.metrics["value"], "metrics": output.metrics, "n": len(queries) - output.skipped,
            "skipped": output.skipped, "prefix_tokens": output.prefix_tokens, "max_tokens": max_tokens,
            "prefix_cache": ev.prefix_cache, "seconds": round(output.seconds, 2),
        }
        results.append(record)
        write_atomic(results_path, json.dumps(results, indent=1, ensure_ascii=False))
    return results


def summary_table(results: list[dict]) -> str:
    """Mean ± std over seeds per (method, task, shots)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["task"], str(r["shots_requested"])), []).append(r)
    lines = [f"{'method':<18} {'task':<22} {'shots':>6} {'used':>5} {'metric':<14} {'value':>15} {'n':>5} {'s/query':>8}"]
    for (method, task, k), rs in groups.items():
        values = [r["value"] for r in rs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        per_query = sum(r["seconds"] for r in rs) / max(sum(r["n"] for r in rs), 1)
        lines.append(
            f"{method:<18} {task:<22} {k:>6} {rs[0]['shots']:>5} {rs[0]['metric']:<14} "
            f"{statistics.mean(values):>8.3f} ± {std:.3f} {rs[0]['n']:>5} {per_query:>8.3f}"
        )
    return "\n".join(lines)
