"""Cells -> results.json: plan every (task, shots, seed) cell, skip the finished ones, run the rest.

``results.json`` is rewritten atomically after every cell, so an interrupted run loses nothing and a rerun
does only what is missing. Under ``accelerate launch`` (or torchrun) the cells are dealt round robin to the
ranks; each rank keeps its finished records in ``results.rank<k>.json`` and rank 0 merges them into
``results.json`` in plan order, so the file holds the same records as a one-process run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from manyicl.errors import ManyICLError
from manyicl.evaluation.backend_hf import hf_backend
from manyicl.evaluation.cells import CellOutput, evaluate_cell
from manyicl.evaluation.curves import curves_left, run_curves
from manyicl.evaluation.prompting import Prompter, check_shots, shot_budget
from manyicl.evaluation.records import CellRecord, cell_key, read_cell_records, records_json, write_cell_records
from manyicl.families import FAMILIES
from manyicl.files import write_atomic
from manyicl.metrics import rouge_setup
from manyicl.models import check_adapter
from manyicl.runlock import run_lock
from manyicl.tasks import Example, Task, answer_form, choice_text

if TYPE_CHECKING:  # the settings' types only: the config is turned into them at run_evaluation, above
    from manyicl.config import EvaluationConfig, ExperimentConfig, FormatConfig, ModelConfig

CURVE_ROLES = ("held_out", "in_distribution")  # the tasks whose learning curves are measured


@dataclass
class PlannedCell:
    task: Task
    role: str  # "held_out" or "forgetting"
    queries: list[Example]
    shots: int | str  # as requested
    seed: int


@dataclass(frozen=True)
class Evaluated:
    """Whose records one run_evaluation call writes, and where: the same for every cell."""

    method: str
    model: ModelConfig  # the base model
    adapter: str | None
    out: Path


def check_golds(task: Task, queries: list[Example], labels: tuple[str, ...], multiple_choice: str = "cloze") -> None:
    """Before any work: every gold of a ranked task must be a candidate, or accuracy is silently capped."""
    if not FAMILIES[task.family].ranked:
        return
    if answer_form(task, multiple_choice) == "cloze":
        for q in queries:
            choice_text(q, q.output)  # the gold letter names one of the query's choices
        return
    for q in queries:
        if q.output not in labels:
            where = q.source or task.name
            raise ManyICLError(f"{where}: gold label {q.output!r} is not in the label set {list(labels)}; "
                               "add it to task.yaml labels")


def check_contexts(ev: EvaluationConfig, model: ModelConfig, budget: int, shots: list[Any] | None = None) -> None:
    """Before any work: every context the evaluation asks for (the ``budget``, and each ``max@N``) fits the model."""
    from manyicl.models import context_length

    requested = [*(shots or ev.shots), *ev.forgetting_shots, *ev.in_distribution_shots, 0]
    longest = max(shot_budget(k, budget)[1] for k in requested)
    context = context_length(model.name, model.trust_remote_code)
    if context and longest > context:
        raise ManyICLError(f"evaluation: a context of {longest} tokens exceeds the model's context length ({context}); "
                           f"lower evaluation.max_tokens or the max@ shots")


def load_results(path: Path) -> list[CellRecord]:
    return read_cell_records(path, "start the evaluation again")


def _ranks() -> tuple[int, int]:
    """(rank, world size); joins the process group that ``accelerate launch``/torchrun describe, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _partials(out: Path) -> list[Path]:
    return sorted(out.glob("results.rank*.json"))


def run_evaluation(
    config: ExperimentConfig,
    tasks: list[tuple[Task, str]],
    method: str = "base",
    adapter: str | None = None,
    output_dir: str | Path | None = None,
    loaded: tuple[Any, Any] | None = None,
    shots: list[Any] | None = None,
) -> list[dict]:
    """Evaluate every (task, shots, seed) cell not already in ``<output_dir>/results.json``; returns every record of
    that file, as it holds them (records.CellRecord.to_json).

    ``tasks`` pairs each task with its role ("held_out", "forgetting" or "in_distribution"). With
    ``evaluation.learning_curve`` the held-out and in-distribution tasks also get their learning curves
    (curves.py, into ``<output_dir>/curves.json``).
    """
    # the recipe level: below here every function takes the settings it uses
    who = Evaluated(method, config.model, adapter, Path(output_dir or config.output_dir))
    with run_lock(who.out):  # one process per run folder
        return _evaluate(config.evaluation, config.format, config.evaluation_tokens, who, tasks, loaded, shots)


def _evaluate(ev: EvaluationConfig, fmt: FormatConfig, max_tokens: int, who: Evaluated, tasks: list[tuple[Task, str]],
              loaded: tuple[Any, Any] | None, shots: list[Any] | None) -> list[dict]:
    from tqdm.auto import tqdm

    out, method, adapter, model_name = who.out, who.method, who.adapter, who.model.name
    results_path = out / "results.json"
    rank, world = _ranks()

    plan = _plan(ev, fmt.multiple_choice, tasks, max_tokens, shots)  # validated before any model work or any write
    keys = [cell_key(method, model_name, adapter, c.task.name, c.shots, c.seed) for c in plan]
    results = load_results(results_path)
    if world == 1 and _partials(out):  # records of an interrupted multi-rank run
        results = _fold_partials(out, results_path, results, keys)
    done = {r.key for r in results} | {r.key for p in _partials(out) for r in load_results(p)}
    todo = [c for c, key in zip(plan, keys) if key not in done]
    curve_tasks = [(t, role) for t, role in tasks if role in CURVE_ROLES] if ev.learning_curve else []
    if adapter and (todo or curves_left([t for t, _ in curve_tasks], out, method, model_name, adapter, max_tokens,
                                        ev.curve_sequences)):
        # before any model work, and only when there is work: a run folder rebuilt from its committed records
        # (scripts/run_real.sh) keeps no per-task weights, and its finished cells need none
        check_adapter(adapter)
    check_contexts(ev, who.model, max_tokens, shots)
    mine = todo[rank::world]

    model_and_tokenizer = _model_loader(who.model, adapter, loaded)
    if mine:
        model, tokenizer = model_and_tokenizer()
        longest = max(shot_budget(c.shots, max_tokens)[1] for c in mine)
        backend = hf_backend(model, tokenizer, longest, ev.prefix_cache, ev.batch_tokens)
        # one process writes results.json as it goes; several ranks each keep their own partial file
        own_path = results_path if world == 1 else out / f"results.rank{rank}.json"
        own = results if world == 1 else load_results(own_path)
        # a cell whose prompts equal an earlier cell's (32 shots where only 24 fit = max) reuses its outputs
        same_prompts: dict[tuple, tuple[Any, Any]] = {}
        for cell in tqdm(mine, desc=f"eval {method}", unit="cell", dynamic_ncols=True, disable=rank != 0):
            own.append(_run_cell(ev, fmt, who, cell, backend, tokenizer, max_tokens, same_prompts))
            write_cell_records(own_path, own)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _fold_partials(out, results_path, results, keys)
        dist.barrier()
        results = load_results(results_path)
    if curve_tasks and rank == 0:  # one process measures the curves (a forward per sequence: cheap)
        run_curves(curve_tasks, out, method, model_name, adapter, max_tokens, ev.curve_sequences,
                   fmt.formatter, model_and_tokenizer)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return records_json(results)


def _plan(ev: EvaluationConfig, multiple_choice: str, tasks: list[tuple[Task, str]], max_tokens: int,
          shots: list[Any] | None) -> list[PlannedCell]:
    """Every (task, shots, seed) cell of the evaluation, each task's golds and shot counts checked."""
    plan: list[PlannedCell] = []
    role_shots = {"held_out": shots or ev.shots, "forgetting": ev.forgetting_shots,
                  "in_distribution": ev.in_distribution_shots}
    for task, role in tasks:
        queries = task.test[: ev.max_queries] if ev.max_queries else task.test
        if not queries:
            raise ManyICLError(f"task {task.name}: no test examples to evaluate; add a test.jsonl")
        check_golds(task, queries, tuple(task.labels or ()), multiple_choice)
        for k in role_shots[role]:
            check_shots(task, shot_budget(k, max_tokens)[0])
            # without demonstrations every seed gives the same prompts: one cell, not len(seeds) copies of it
            plan += [PlannedCell(task, role, queries, k, seed) for seed in (ev.seeds[:1] if k == 0 else ev.seeds)]
    return plan


def _model_loader(base: ModelConfig, adapter: str | None,
                  loaded: tuple[Any, Any] | None) -> Callable[[], tuple[Any, Any]]:
    """(model, tokenizer), loaded at the first call, and only then: when a cell or a curve is left to measure."""
    from manyicl.models import for_inference, load_model, load_tokenizer

    loaded_now: list[tuple[Any, Any]] = []
    model_name = base.name

    def model_and_tokenizer() -> tuple[Any, Any]:
        if not loaded_now:
            model, tokenizer = loaded or (None, None)
            if model is None:
                tokenizer = load_tokenizer(model_name, base.trust_remote_code)
                # an adapter is merged into the weights: the same scores, a faster forward (a caller's model is kept)
                model = for_inference(load_model(model_name, base.trust_remote_code, adapter=adapter))
            model.eval()
            if torch.cuda.is_available():  # one GPU per rank under accelerate launch
                model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
            loaded_now.append((model, tokenizer))
        return loaded_now[0]

    return model_and_tokenizer


def _fold_partials(out: Path, results_path: Path, results: list[CellRecord], keys: list[tuple]) -> list[CellRecord]:
    """Append the ranks' records to results.json in plan order (as one process would have), then drop them."""
    new = {r.key: r for p in _partials(out) for r in load_results(p)}
    have, planned = {r.key for r in results}, set(keys)
    results = results + [new[k] for k in keys if k in new and k not in have]
    results += [r for k, r in new.items() if k not in have and k not in planned]  # cells of another plan: kept
    write_cell_records(results_path, results)
    for p in _partials(out):
        p.unlink()
    return results


def _run_cell(ev: EvaluationConfig, fmt: FormatConfig, who: Evaluated, cell: PlannedCell, backend: Any,
              tokenizer: Any, max_tokens: int, same_prompts: dict | None = None) -> CellRecord:
    task = cell.task
    shots, max_tokens = shot_budget(cell.shots, max_tokens)
    prompter = Prompter(task, tokenizer, fmt.formatter(task, tokenizer), max_tokens,
                        ev.max_new_tokens.get(task.family))
    demos = prompter.choose_demonstrations(shots, cell.seed, ev.balance_labels, cell.queries)
    prompts = (task.name, cell.role, max_tokens, tuple((d.input, d.output) for d in demos))
    reused_from = None
    if same_prompts is not None and prompts in same_prompts:
        reused_from, output = same_prompts[prompts]
    else:
        output = evaluate_cell(backend, prompter, demos, cell.queries, ev.scoring)
        if same_prompts is not None:
            same_prompts[prompts] = (cell.shots, output)
    predictions = Path("predictions") / who.method / f"{task.name}_shots{cell.shots}_seed{cell.seed}.jsonl"
    write_atomic(who.out / predictions, "".join(
        json.dumps({"input": p.input, "prediction": p.prediction, "golds": list(p.golds), "skipped": p.skipped,
                    "metric_row": row, **({"scores": p.scores} if p.scores else {})}, ensure_ascii=False) + "\n"
        for p, row in zip(output.predictions, output.rows)
    ))
    return _record(ev, who, cell, output, prompter, predictions=predictions.as_posix(),
                   backend=type(backend).__name__, reused_from=reused_from)


def _record(ev: EvaluationConfig, who: Evaluated, cell: PlannedCell, output: CellOutput, prompter: Prompter, *,
            predictions: str, backend: str, reused_from: int | str | None) -> CellRecord:
    """The one place a cell's outputs become its record; ``reused_from``: the shots of the earlier cell with the same
    demonstrations and queries, whose outputs these are (None: measured here)."""
    task = cell.task
    label_set = prompter.family.label_set  # only these have label histograms
    return CellRecord(
        model=who.model.name, adapter=who.adapter, method=who.method, role=cell.role, task=task.name,
        family=task.family, metric=task.metric, shots=output.shots, shots_requested=cell.shots, seed=cell.seed,
        value=output.metrics["value"], ci_low=output.ci_low, ci_high=output.ci_high, metrics=output.metrics,
        n=len(cell.queries), skipped=output.skipped, prefix_tokens=output.prefix_tokens,
        max_tokens=prompter.max_tokens, answer_form=output.answer_form,
        scoring=ev.scoring if prompter.ranked else None,
        metric_setup=rouge_setup(task.language) if task.metric == "rouge_l" else None,
        demo_labels=output.demo_labels if label_set else None,
        prediction_counts=output.prediction_counts if label_set else None,
        gold_counts=output.gold_counts if label_set else None, collapsed=output.collapsed if label_set else None,
        predictions=predictions, prefix_cache=ev.prefix_cache, backend=backend,
        seconds=0.0 if reused_from is not None else round(output.seconds, 2), same_prompts_as=reused_from,
    )
