"""One (task, shots, seed) cell: prompts -> backend -> predictions -> metrics.

Label-set families rank every label by the log-likelihood of its answer tokens (summed, or the mean per
token with ``length_normalize``); ``multilabel`` generates the list and keeps known labels; the other
families decode greedily until the end-of-answer delimiter.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

from manyicl.evaluation.backend import Backend, Stop
from manyicl.evaluation.prompting import Prompter
from manyicl.metrics import score, split_labels
from manyicl.tasks import Example


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


def stop_for(prompter: Prompter) -> Stop:
    """Stop at the delimiter or at ANY end-of-sequence id the tokenizer or model declares."""
    tokenizer = prompter.tokenizer
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids |= set(getattr(tokenizer, "additional_eos_token_ids", None) or ())
    return Stop(frozenset(i for i in ids if i is not None), prompter.formatter.delimiter, prompter.max_new_tokens)


def evaluate_cell(backend: Backend, prompter: Prompter, demos: list[Example], queries: list[Example],
                  length_normalize: bool = False) -> CellOutput:
    start = time.perf_counter()
    task, formatter = prompter.task, prompter.formatter
    prefix = prompter.prefix_ids(demos)
    context = prompter.context(demos)
    encoded = [prompter.encode_query(context, q.input) for q in queries]
    if queries:
        prompter.check_in_context(demos, prefix, queries[0], encoded[0])
    fits = [len(prefix) + prompter.query_budget(e) <= prompter.max_tokens for e in encoded]
    kept = [i for i, ok in enumerate(fits) if ok]
    predictions = [Prediction(q.input, "", q.golds, skipped=True) for q in queries]
    if prompter.ranked:
        logps = backend.score(prefix, [encoded[i].ids for i in kept], [encoded[i].candidates for i in kept])
        for i, per_candidate in zip(kept, logps):
            values = [sum(lp) / len(lp) if length_normalize else sum(lp) for lp in per_candidate]
            best = max(range(len(values)), key=values.__getitem__)
            predictions[i] = Prediction(queries[i].input, prompter.labels[best], queries[i].golds, dict(zip(prompter.labels, values)))
    else:
        generated = backend.generate(prefix, [encoded[i].ids for i in kept], stop_for(prompter))
        for i, ids in zip(kept, generated):
            text = formatter.strip_answer(prompter.tokenizer.decode(ids))
            if task.family == "multilabel":
                text = ", ".join(l for l in split_labels(text) if l in prompter.labels)
            predictions[i] = Prediction(queries[i].input, text, queries[i].golds)
    skipped = len(queries) - len(kept)
    if skipped:
        warnings.warn(f"{task.name}: {skipped} queries skipped: each alone overflows {prompter.max_tokens} tokens", stacklevel=2)
    done = [p for p in predictions if not p.skipped]
    metrics = score(task.metric, [p.prediction for p in done], [p.golds for p in done]) if done else {"value": float("nan")}
    return CellOutput(len(demos), len(prefix), predictions, time.perf_counter() - start, skipped, metrics)
