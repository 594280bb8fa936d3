"""``manyicl predict``: a new task solved by prompting — demonstrations from one file, queries from another."""

from __future__ import annotations

import json
from pathlib import Path

from manyicl.config import EvaluationConfig
from manyicl.errors import ManyICLError
from manyicl.evaluation import Prompter, evaluate_cell, hf_backend
from manyicl.families import FAMILIES
from manyicl.files import check_output_file, write_atomic
from manyicl.formatter import Formatter
from manyicl.models import check_adapter, for_inference, load_model, load_tokenizer
from manyicl.tasks import Task, answer_labels, read_examples

DEFAULTS = EvaluationConfig()  # predict uses evaluation's defaults


def predict_file(model_name: str, adapter: str | None, demos_path: str, inputs_path: str, shots: str, output: str,
                 family: str, labels: str | None, max_tokens: int, seed: int, scoring: str = DEFAULTS.scoring,
                 balance_labels: bool = DEFAULTS.balance_labels) -> tuple[int, str | None]:
    """Writes one prediction per input; returns how many, and the metric with its interval when every input has
    an output."""
    if family not in FAMILIES:
        raise ManyICLError(f"--family: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if shots != "max" and not shots.isdigit():
        raise ManyICLError(f"--shots: expected a number or max, got {shots!r}")
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
    if label_set and FAMILIES[family].label_set:
        for ex in demos + [q for q in queries if q.output]:
            for label in answer_labels(ex, family):
                if label not in label_set:
                    raise ManyICLError(f"{ex.source}: answer {label!r} is not in --labels {label_set}; add it to "
                                       "--labels or correct the record")
    task = Task("predict", family, demos, queries, labels=label_set, source=demos_path)
    tokenizer = load_tokenizer(model_name)
    model = for_inference(load_model(model_name, adapter=adapter))
    prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), max_tokens)
    chosen = prompter.choose_demonstrations(shots if shots == "max" else int(shots), seed, balance_labels, queries)
    result = evaluate_cell(hf_backend(model, tokenizer, max_tokens), prompter, chosen, queries, scoring)
    lines = []
    for q, p in zip(queries, result.predictions):
        line = {"input": q.input, "prediction": None if p.skipped else p.prediction}
        if q.output:
            line["output"] = q.output
        if p.skipped:
            line["skipped"] = "the input alone overflows --max-tokens"
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
