"""The in-context learning curve: how well a model predicts answer k of a task given the k-1 answers before it.

This is what the mask-all-targets objective trains, measured directly: many_shot_all sequences built from a task's
TEST split (the same builder and formatter as training, so the same answer form), one forward each, and the
negative log-likelihood of every answer (its supervised tokens: the answer and its end-of-answer delimiter). A
model that learns in context assigns later answers a lower loss. Far less noisy than accuracy on a few hundred
queries, since every answer of every sequence counts and nothing is thresholded.

The sequences depend only on the task, the tokenizer, the format and the budget (seeds ``0..n-1``), so every
method is measured on the very same token ids and differences between methods are paired by sequence. Records
go to ``<output_dir>/curves.json`` (rewritten atomically after each task; a rerun does only what is missing);
``manyicl.reporting.curves`` and ``reporting.plots`` turn them into the report's table and plot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from manyicl.errors import ManyICLError
from manyicl.files import read_records, write_atomic
from manyicl.sequences import IGNORE_INDEX, Sequence, SequenceBuilder
from manyicl.tasks import Task
from manyicl.training.loss import accepts_logits_to_keep

CURVES_FILE = "curves.json"


def curve_sequences(task: Task, tokenizer: Any, formatter: Any, max_tokens: int, n_sequences: int) -> list[Sequence]:
    """``n_sequences`` many_shot_all sequences of the task's test examples, each filling ``max_tokens``."""
    if not task.test:
        raise ManyICLError(f"task {task.name}: no test examples to build learning-curve sequences from; "
                           "add a test.jsonl")
    test_only = replace(task, train=list(task.test), test=[])
    builder = SequenceBuilder(test_only, tokenizer, formatter, max_tokens, "many_shot_all")
    return [builder.build(seed) for seed in range(n_sequences)]


def ids_digest(ids: list[int]) -> str:
    """Identifies a sequence's tokens, so that records of two methods are paired only on identical sequences."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


@torch.no_grad()
def answer_losses(model: Any, seq: Sequence) -> tuple[list[float], list[int]]:
    """Per answer of the sequence, in order: its summed token NLL (nats) and its token count. One forward; the LM
    head runs only where an answer token is predicted (training/loss.py)."""
    device = next(model.parameters()).device
    ids = torch.tensor([seq.input_ids], device=device)
    labels = torch.tensor([seq.labels], device=device)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if accepts_logits_to_keep(model):
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(input_ids=ids, use_cache=False).logits[keep]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:][keep[:, :-1]],
                             reduction="none")
    sizes = [e - s for s, e in seq.target_spans]
    return [float(part.sum()) for part in torch.split(losses, sizes)], sizes


def load_curves(path: Path) -> list[dict]:
    return read_records(path, "measure the learning curves again")


def curve_key(method: str, model: str, adapter: str | None, task: str, seed: int, max_tokens: int) -> tuple:
    return (method, model, adapter, task, seed, max_tokens)


def _record_key(r: dict) -> tuple:
    return curve_key(r["method"], r["model"], r.get("adapter"), r["task"], r["seed"], r["max_tokens"])


def _missing(records: list[dict], method: str, model_name: str, adapter: str | None, max_tokens: int,
             n_sequences: int) -> Callable[[Task], list[int]]:
    """The sequences of a task whose curve is not in ``records``."""
    done = {_record_key(r) for r in records}
    return lambda task: [s for s in range(n_sequences)
                         if curve_key(method, model_name, adapter, task.name, s, max_tokens) not in done]


def curves_left(tasks: list[Task], out: Path, method: str, model_name: str, adapter: str | None, max_tokens: int,
                n_sequences: int) -> bool:
    """Whether any curve of ``tasks`` is still to be measured in ``<out>/curves.json``."""
    missing = _missing(load_curves(out / CURVES_FILE), method, model_name, adapter, max_tokens, n_sequences)
    return any(missing(task) for task in tasks)


def run_curves(tasks: list[tuple[Task, str]], out: Path, method: str, model_name: str, adapter: str | None,
               max_tokens: int, n_sequences: int, formatter_for: Callable[[Task, Any], Any],
               model_and_tokenizer: Callable[[], tuple[Any, Any]]) -> list[dict]:
    """Measure the curve of every (task, sequence) not yet in ``<out>/curves.json``. ``model_and_tokenizer`` is
    called only when something is left to measure; ``tasks`` pairs each task with its role."""
    from tqdm.auto import tqdm

    path = out / CURVES_FILE
    records = load_curves(path)
    missing = _missing(records, method, model_name, adapter, max_tokens, n_sequences)
    todo = [(task, role) for task, role in tasks if missing(task)]
    if not todo:
        return records
    model, tokenizer = model_and_tokenizer()
    for task, role in tqdm(todo, desc=f"curves {method}", unit="task", dynamic_ncols=True):
        sequences = curve_sequences(task, tokenizer, formatter_for(task, tokenizer), max_tokens, n_sequences)
        for seed in missing(task):
            seq = sequences[seed]
            nll, tokens = answer_losses(model, seq)
            records.append({
                "method": method, "model": model_name, "adapter": adapter, "task": task.name, "role": role,
                "family": task.family, "seed": seed, "max_tokens": max_tokens, "n_tokens": seq.n_tokens,
                "ids_sha256": ids_digest(seq.input_ids), "answer_nll": [round(x, 5) for x in nll],
                "answer_tokens": tokens,
            })
        write_atomic(path, json.dumps(records, indent=1))
    return records
