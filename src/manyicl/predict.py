"""A new task solved by prompting: demonstrations chosen once, then any number of queries answered after them.

``PromptedTask`` is the one code path of ``manyicl predict`` (demonstrations from one file, queries from another)
and of ``manyicl serve`` (a task registered once, queried many times): the same demonstrations, shots, seed and
scoring give the same predictions in both.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manyicl.config import EvaluationConfig
from manyicl.errors import ManyICLError
from manyicl.evaluation import Prompter, evaluate_cell, hf_backend
from manyicl.evaluation.cells import CellOutput, Prediction
from manyicl.families import FAMILIES
from manyicl.files import check_output_file, write_atomic
from manyicl.formatter import Formatter
from manyicl.models import check_adapter, for_inference, load_model, load_tokenizer
from manyicl.task_files import read_examples
from manyicl.tasks import Example, Task, answer_labels

DEFAULTS = EvaluationConfig()  # predict and serve use evaluation's defaults
PROMPTED_TASK = "predict"
TOO_LONG = "the input alone overflows the context (max_tokens)"


def check_shots_text(shots: str, where: str = "--shots") -> int | str:
    if shots != "max" and not shots.isdigit():
        raise ManyICLError(f"{where}: expected a number or max, got {shots!r}")
    return shots if shots == "max" else int(shots)


def prompt_task(family: str, demos: list[Example], labels: list[str] | None, instruction: str = "",
                where: str = "--demos", labels_name: str = "--labels", queries: list[Example] = ()) -> Task:
    """The task the demonstrations define; answers outside a declared label set (the demonstrations', and those
    of the ``queries`` that have one) are errors naming the record.
    Its name is always PROMPTED_TASK: the demonstration draw is seeded by task name and seed, so one name makes a
    served task draw what ``manyicl predict`` draws from the same demonstrations and seed."""
    if family not in FAMILIES:
        raise ManyICLError(f"family: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if not demos:
        raise ManyICLError(f"{where}: no demonstrations")
    if labels and FAMILIES[family].label_set:
        for ex in [*demos, *(q for q in queries if q.output)]:
            for label in answer_labels(ex, family):
                if label not in labels:
                    raise ManyICLError(f"{ex.source}: answer {label!r} is not in {labels_name} {labels}; add it to "
                                       f"{labels_name} or correct the record")
    template = {"instruction": instruction} if instruction else {}
    return Task(PROMPTED_TASK, family, demos, [], labels=labels or None, template=template, source=where)


@dataclass
class PromptedTask:
    """A task's prompt: its demonstrations chosen once (``shots``, ``seed``, label balance), fitted to
    ``max_tokens`` next to ``reserve`` tokens per query (None: next to the longest of the queries given)."""

    task: Task
    prompter: Prompter
    demonstrations: list[Example]
    scoring: str

    @classmethod
    def build(cls, task: Task, tokenizer: Any, shots: int | str, seed: int, scoring: str, max_tokens: int,
              balance_labels: bool = DEFAULTS.balance_labels, reserve: int | None = None,
              queries: list[Example] = ()) -> "PromptedTask":
        prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), max_tokens)
        chosen = prompter.choose_demonstrations(shots, seed, balance_labels, list(queries), reserve)
        return cls(task, prompter, chosen, scoring)

    @property
    def prefix(self) -> list[int]:
        return self.prompter.prefix_ids(self.demonstrations)

    def label_histogram(self) -> dict[str, int]:
        if not self.prompter.family.label_set:
            return {}
        return dict(Counter(self.task.label_of(d) for d in self.demonstrations))

    def answer(self, backend: Any, queries: list[Example]) -> CellOutput:
        return evaluate_cell(backend, self.prompter, self.demonstrations, queries, self.scoring)


def probabilities(prediction: Prediction, scoring: str) -> dict[str, float] | None:
    """Every label's probability under the chosen scoring: a softmax of its scores over the candidates."""
    if not prediction.scores:
        return None
    scores = prediction.scores[scoring]
    top = max(scores.values())
    weights = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def predict_file(model_name: str, adapter: str | None, demos_path: str, inputs_path: str, shots: str, output: str,
                 family: str, labels: str | None, max_tokens: int, seed: int, scoring: str = DEFAULTS.scoring,
                 balance_labels: bool = DEFAULTS.balance_labels, reserve: int | None = None,
                 instruction: str = "") -> tuple[int, str | None]:
    """Writes one prediction per input; returns how many, and the metric with its interval when every input has
    an output."""
    if family not in FAMILIES:
        raise ManyICLError(f"--family: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    wanted = check_shots_text(shots)
    check_output_file(Path(output), "--output")
    if adapter:
        check_adapter(adapter)
    demos = read_examples(Path(demos_path))
    queries = read_examples(Path(inputs_path), require_output=False)
    if not demos:
        raise ManyICLError(f"{demos_path}: no demonstrations")
    if not queries:
        raise ManyICLError(f"{inputs_path}: no inputs")
    label_set = [part.strip() for part in labels.split(",") if part.strip()] if labels else None
    task = prompt_task(family, demos, label_set, instruction, where=demos_path, queries=queries)
    tokenizer = load_tokenizer(model_name)
    model = for_inference(load_model(model_name, adapter=adapter))
    prompted = PromptedTask.build(task, tokenizer, wanted, seed, scoring, max_tokens, balance_labels, reserve, queries)
    result = prompted.answer(hf_backend(model, tokenizer, max_tokens), queries)
    lines = []
    for q, p in zip(queries, result.predictions):
        line: dict[str, Any] = {"input": q.input, "prediction": None if p.skipped else p.prediction}
        if p.scores and not p.skipped:
            line["probabilities"] = probabilities(p, scoring)
        if q.output:
            line["output"] = q.output
        if p.skipped:
            line["skipped"] = TOO_LONG
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    write_atomic(Path(output), "".join(lines))
    summary = None
    if all(q.output for q in queries):
        summary = (f"{task.metric} {result.metrics['value']:.3f} [95% CI {result.ci_low:.3f}, {result.ci_high:.3f}] on "
                   f"{len(queries)} inputs ({result.skipped} too long, scored wrong), {result.shots} demonstrations")
        if result.prediction_counts:
            summary += (f"; predictions {result.prediction_counts}"
                        + (" — ONE LABEL TAKES >= 90 %" if result.collapsed else ""))
    return len(lines), summary
