"""One (task, shots, seed) cell: prompts -> backend -> predictions -> metric with its interval.

Ranked families score every candidate by the log-likelihood of its answer tokens (the end-of-answer delimiter
is not part of the score), four ways, all kept per query: ``sum``; ``mean`` per token; ``per_char``, the sum
over the answer's characters (lm-evaluation-harness's acc_norm); ``calibrated``, contextual calibration (Zhao
et al. 2021): the summed log-probability minus the log of its mean probability after the same demonstrations
with content-free queries ("N/A", ""). ``evaluation.scoring`` names the one that predicts. Generated families
decode greedily until the delimiter or an end-of-sequence id. A query too long for the context is a wrong answer
that is counted, never dropped from the denominator.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from manyicl.evaluation.backend import Backend, Stop
from manyicl.evaluation.prompting import CONTENT_FREE_INPUTS, EncodedQuery, Prompter
from manyicl.metrics import METRICS, metric_rows, score
from manyicl.tasks import Example
from manyicl.uncertainty import cell_interval

CALIBRATIONS_KEPT = 1024  # content-free scores kept per prompter (see rank_candidates)
COLLAPSE_SHARE = 0.9  # one label takes at least this share of the predictions ...


@dataclass
class Prediction:
    input: str
    prediction: str
    golds: tuple[str, ...]
    scores: dict[str, dict[str, float]] | None = None  # scoring -> candidate -> score (ranked families)
    skipped: bool = False  # the query alone overflows the context: scored as wrong


@dataclass
class CellOutput:
    shots: int  # demonstrations actually used
    prefix_tokens: int
    predictions: list[Prediction]
    seconds: float
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    rows: list[list[float]] = field(default_factory=list)  # per-query metric rows (metrics.py), for paired tests
    demo_labels: dict[str, int] = field(default_factory=dict)
    prediction_counts: dict[str, int] = field(default_factory=dict)
    gold_counts: dict[str, int] = field(default_factory=dict)
    collapsed: bool = False  # one label takes >= 90 % of the predictions while the golds are not that skewed
    answer_form: str = ""


def stop_for(prompter: Prompter) -> Stop:
    """Stop at the delimiter or at ANY end-of-sequence id the tokenizer declares."""
    tokenizer = prompter.tokenizer
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids |= set(getattr(tokenizer, "additional_eos_token_ids", None) or ())
    return Stop(frozenset(i for i in ids if i is not None), prompter.formatter.delimiter, prompter.max_new_tokens)


def _answer_logprob(token_logprobs: list[float], encoded: EncodedQuery, k: int) -> float:
    return sum(token_logprobs[: encoded.answer_tokens[k]])


def rank_candidates(backend: Backend, prompter: Prompter, prefix: list[int], context: str, queries: list[Example],
         encoded: list[EncodedQuery]) -> list[dict[str, dict[str, float]]]:
    """Every scoring of every candidate of every query, in one backend call (content-free queries included the
    first time a prefix meets a candidate list; prompter.calibration keeps their scores for the next calls)."""
    known, key = prompter.calibration, hashlib.blake2b(np.asarray(prefix, dtype=np.int64).tobytes()).digest()
    # content-free queries once per distinct candidate list (one for a label set; per query for cloze choices)
    free: dict[tuple[str, ...], list[EncodedQuery]] = {}
    for q in queries:
        texts = tuple(prompter.candidates(q)[1])
        if texts not in free and (key, texts) not in known:
            free[texts] = [prompter.encode_query(context, Example(x, "", choices=q.choices))
                           for x in CONTENT_FREE_INPUTS]
    extra = [e for group in free.values() for e in group]
    logps = backend.score(prefix, [e.ids for e in encoded + extra], [e.candidates for e in encoded + extra])
    free_logps = iter(logps[len(encoded):])
    baseline = {}  # candidate texts -> log of the mean content-free probability of each candidate
    for texts, group in free.items():
        per_input = [[_answer_logprob(lp[k], e, k) for k in range(len(texts))] for e, lp in zip(group, free_logps)]
        baseline[texts] = [math.log(np.mean(np.exp([row[k] for row in per_input]))) for k in range(len(texts))]
    for q in queries:
        texts = tuple(prompter.candidates(q)[1])
        if texts not in baseline:
            baseline[texts] = known[(key, texts)]
            known.move_to_end((key, texts))
    known.update({(key, texts): values for texts, values in baseline.items()})
    while len(known) > CALIBRATIONS_KEPT:
        known.popitem(last=False)
    out = []
    for q, e, lp in zip(queries, encoded, logps):
        names, texts = prompter.candidates(q)
        summed = [_answer_logprob(lp[k], e, k) for k in range(len(names))]
        out.append({
            "sum": dict(zip(names, summed)),
            "mean": {n: s / e.answer_tokens[k] for k, (n, s) in enumerate(zip(names, summed))},
            "per_char": {n: s / e.answer_chars[k] for k, (n, s) in enumerate(zip(names, summed))},
            "calibrated": {n: s - baseline[tuple(texts)][k] for k, (n, s) in enumerate(zip(names, summed))},
        })
    return out


def evaluate_cell(backend: Backend, prompter: Prompter, demos: list[Example], queries: list[Example],
                  scoring: str = "sum") -> CellOutput:
    start = time.perf_counter()
    task = prompter.task
    prefix = prompter.prefix_ids(demos)
    context = prompter.context(demos)
    encoded = [prompter.encode_query(context, q) for q in queries]
    if queries:
        prompter.check_in_context(demos, prefix, queries[0], encoded[0])
    kept = [i for i, e in enumerate(encoded) if len(prefix) + prompter.query_budget(e) <= prompter.max_tokens]
    predictions = [Prediction(q.input, "", q.golds, skipped=True) for q in queries]
    if prompter.ranked:
        scored = rank_candidates(backend, prompter, prefix, context, [queries[i] for i in kept],
                                 [encoded[i] for i in kept])
        for i, scores in zip(kept, scored):
            chosen = scores[scoring]
            predictions[i] = Prediction(queries[i].input, max(chosen, key=chosen.__getitem__), queries[i].golds, scores)
    else:
        generated = backend.generate(prefix, [encoded[i].ids for i in kept], stop_for(prompter))
        for i, ids in zip(kept, generated):
            text = prompter.family.postprocess(prompter.formatter.strip_answer(prompter.tokenizer.decode(ids)),
                                               prompter.labels)
            predictions[i] = Prediction(queries[i].input, text, queries[i].golds)
    skipped = len(queries) - len(kept)
    if skipped:
        warnings.warn(f"{task.name}: {skipped} queries too long for {prompter.max_tokens} tokens: scored as wrong",
                      stacklevel=2)
    texts, golds = [p.prediction for p in predictions], [p.golds for p in predictions]
    output = CellOutput(len(demos), len(prefix), predictions, 0.0, skipped, answer_form=prompter.answer_form)
    if queries and all(q.output or q.answers for q in queries):  # (a served request's inputs have no golds)
        rows = metric_rows(task.metric, texts, golds, prompter.labels, task.language)
        interval = cell_interval(rows, METRICS[task.metric].from_means)
        output.metrics = score(task.metric, texts, golds, prompter.labels, task.language)
        output.ci_low, output.ci_high, output.rows = interval.low, interval.high, rows.tolist()
    if prompter.family.label_set:
        output.demo_labels = dict(Counter(task.label_of(d) for d in demos))
        output.prediction_counts = dict(Counter(p.prediction for p in predictions if not p.skipped))
        output.gold_counts = dict(Counter(q.output for q in queries))
        output.collapsed = is_collapsed(output.prediction_counts, output.gold_counts)
    output.seconds = time.perf_counter() - start
    return output


def is_collapsed(prediction_counts: dict[str, int], gold_counts: dict[str, int]) -> bool:
    """One label takes >= 90 % of the predictions while the gold labels are not that skewed: the cell then
    measures the demonstrations' label mix, not the model."""
    if not prediction_counts or len(gold_counts) < 2:
        return False
    top = max(prediction_counts.values()) / sum(prediction_counts.values())
    gold_top = max(gold_counts.values()) / sum(gold_counts.values())
    return top >= COLLAPSE_SHARE and gold_top < COLLAPSE_SHARE
