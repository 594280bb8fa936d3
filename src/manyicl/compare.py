"""``manyicl compare``: the paper's experiment on one model, one config, one command.

Methods (all fine-tunes share one budget: steps, sequence length, batch; zero/few-shot sequences are packed
with isolated units so every method sees the same number of tokens per step):

- ``base``               the untuned model, prompted with the same demonstrations
- ``zero_shot_ft``       multi-task fine-tune, query only                       (objective zero_shot)
- ``few_shot_ft``        n demonstrations + query, loss on the last answer       (objective few_shot)
- ``many_shot_last_ft``  many-shot sequences, loss on the last answer            (objective many_shot_last)
- ``manyicl``            many-shot sequences, loss on every answer (ManyICL)     (objective many_shot_all)
- ``task_level``         one LoRA per held-out task, trained on that task alone  (the upper reference)

Every stage writes into ``output_dir`` and is skipped when done, so an interrupted run, or a run with an added
method or task, does only the missing work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from manyicl.catalog import check_split, evaluation_tasks, task_name
from manyicl.config import ExperimentConfig, drop_speed_settings, dump_config
from manyicl.errors import ManyICLError
from manyicl.evaluation import run_evaluation
from manyicl.evaluation.runner import check_contexts
from manyicl.files import clear_folder, write_atomic
from manyicl.methods import METHODS, MIXTURE_METHODS
from manyicl.reporting import summary_table
from manyicl.reporting.budget import BUDGETS_DIR  # budgets/step-<N>/: the checkpoints' results
from manyicl.runlock import LOCK_NAME, run_lock
from manyicl.sequences import OBJECTIVES

# Keys whose change invalidates finished stages; adding methods, held-out tasks, shots or seeds does not. The
# evaluation keys matter only once results.json holds records (a train-only stage has evaluated nothing yet).
TRAIN_KEYS = ("model", "format", "training", "tasks.data_dir", "tasks.meta_train", "tasks.max_train_examples",
              "tasks.synthetic_seed", "compare.task_level_steps")
EVAL_KEYS = ("evaluation.max_queries", "evaluation.max_tokens", "evaluation.scoring", "evaluation.balance_labels",
             "evaluation.max_new_tokens")
RESULT_KEYS = TRAIN_KEYS + EVAL_KEYS
# (compare.task_level_shots may change: added shot counts are evaluated, finished ones kept)


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def check_same_experiment(out: Path, config: ExperimentConfig, overwrite: bool) -> None:

    import yaml

    saved_path = out / "compare_config.yaml"
    if not saved_path.exists():
        return
    if overwrite:
        clear_folder(out, keep=(LOCK_NAME,))
        return
    saved = drop_speed_settings(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = drop_speed_settings(config.model_dump(mode="json"))
    for data in (saved, now):  # the precision as asked for; what it resolves to is shared (with_shared_precision)
        data.get("training", {}).pop("precision", None)
    keys = RESULT_KEYS if (out / "results.json").exists() else TRAIN_KEYS
    differ = [k for k in keys if _get(saved, k) != _get(now, k)]
    if differ:
        raise ManyICLError(
            f"{out}: holds a run made with a different config ({', '.join(differ)} differ); use --overwrite to start "
            f"again or another output_dir"
        )


def trained_precision(out: Path, config: ExperimentConfig, training_here: bool = True) -> str | None:
    """The precision the finished fine-tunes of this run were trained in, which the ones still to train must share
    so that the methods are compared at one precision (``auto`` may resolve differently on another machine, or be
    measured differently). Fine-tunes of two precisions are refused; so is, where a fine-tune is to be trained
    here (``training_here``), an explicit ``training.precision`` that differs or that this machine cannot run."""
    from manyicl.training.precision import training_precision

    trained: dict[str, Path] = {}
    for summary in sorted((out / "train").glob("**/train_summary.json")):
        trained.setdefault(json.loads(summary.read_text()).get("precision", "fp32"), summary.parent)
    if not trained:
        return None
    if len(trained) > 1:
        raise ManyICLError(f"{out / 'train'}: fine-tunes were trained in {' and '.join(sorted(trained))}; retrain one "
                           f"group with training.precision set, or use --overwrite")
    (precision, folder), = trained.items()
    asked = config.training.precision
    if training_here and asked != "auto" and training_precision(asked, config.training.dtype) != precision:
        raise ManyICLError(f"{folder}: trained in {precision}, but this run asks for training.precision {asked}; set "
                           f"training.precision: {precision} (or auto) to go on with this run, or use --overwrite")
    return precision


def with_shared_precision(config: ExperimentConfig, out: Path) -> ExperimentConfig:
    """A method's training config with ``auto`` pinned to the precision of the run's finished fine-tunes."""
    if config.training.precision != "auto" or finished(Path(config.output_dir)):
        return config
    precision = trained_precision(out, config)
    if precision is None:
        return config
    click.echo(f"training.precision auto: {precision}, as the finished fine-tunes of {out} were trained")
    return config.model_copy(update={"training": config.training.model_copy(update={"precision": precision})})


def method_config(config: ExperimentConfig, method: str, out: Path, task: Any = None) -> ExperimentConfig:
    """The training config of one fine-tuned method: the shared budget with that method's objective."""
    data = config.model_dump(mode="json")
    data["output_dir"] = str(out / "train" / method if task is None else out / "train" / method / task_name(task))
    tr = data["training"]
    tr["objective"] = METHODS[method].objective
    if METHODS[method].training == "per_task":
        data["tasks"]["meta_train"] = [task]
        data["tasks"].update(held_out=[], forgetting=[], in_distribution=[], distance={})
        tr["max_steps"] = config.compare.task_level_steps or tr["max_steps"]
    tr["pack"] = OBJECTIVES[tr["objective"]].isolated
    return ExperimentConfig.model_validate(data)


def fine_tunes(config: ExperimentConfig, method: str, out: Path) -> list[ExperimentConfig]:
    """The training configs of a method's fine-tunes: none (base), one on the mixture, or one per held-out task
    (task_level, in the order of tasks.held_out)."""
    training = METHODS[method].training
    refs = [] if training == "none" else config.tasks.held_out if training == "per_task" else [None]
    return [method_config(config, method, out, ref) for ref in refs]


def finished(run_dir: Path) -> bool:
    """Whether the fine-tune in ``run_dir`` is complete: training writes train_summary.json last."""
    return (run_dir / "train_summary.json").exists()


def still_to_train(config: ExperimentConfig, methods: list[str], out: Path) -> bool:
    """Whether one of these methods has a fine-tune not finished yet. Evaluation never reads training.precision, so
    a run trained in bf16 can be evaluated where bf16 training is refused (a CPU without AVX-512 BF16)."""
    return any(not finished(Path(c.output_dir)) for method in methods for c in fine_tunes(config, method, out))


def train_stage(config: ExperimentConfig) -> Path:
    """Train unless a finished run is there; resume a run that was interrupted."""
    out = Path(config.output_dir)
    if finished(out):
        click.echo(f"reusing {out}")
    else:
        from manyicl.training import train  # the trainer (transformers.Trainer, accelerate) only when a stage trains

        train(config, resume=(out / "config.yaml").exists())
    return out / ("adapter" if config.training.finetune == "lora" else "model")


def budget_steps(config: ExperimentConfig) -> list[int]:
    """The steps of the earlier budget points (compare.budgets below 1), checked before any work: each must be a
    checkpoint that training saves and keeps."""
    fractions = sorted({b for b in config.compare.budgets if b < 1})
    tr = config.training
    if not fractions:
        return []
    if tr.epochs is not None or tr.max_steps is None:
        raise ManyICLError("compare.budgets: budget points are fractions of training.max_steps; set max_steps "
                           "instead of epochs, or drop the budgets below 1")
    if tr.save_total_limit is not None:
        raise ManyICLError("compare.budgets: training.save_total_limit deletes the checkpoints the budget points are "
                           "evaluated from; drop save_total_limit")
    steps = []
    for b in fractions:
        step = round(b * tr.max_steps)
        if step < 1 or step % tr.save_steps:
            raise ManyICLError(f"compare.budgets: {b} of {tr.max_steps} steps is step {step}, where no checkpoint is "
                               f"saved (training.save_steps: {tr.save_steps}); choose budgets at multiples of "
                               "save_steps")
        steps.append(step)
    return steps


def evaluate_budgets(config: ExperimentConfig, tasks: list, method: str, out: Path, steps: list[int]) -> None:
    """A mixture fine-tune at each earlier budget point, from the checkpoint saved there: the held-out tasks at
    compare.budget_shots, and the learning curves of the held-out and in-distribution tasks, into
    budgets/step-<N>/ (a results.json and curves.json like the run's own; forgetting is measured at the end)."""
    from manyicl.training.checkpoints import CHECKPOINT_MARKER

    if not steps:
        return
    early = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"in_distribution_shots": []})})
    for step in steps:
        checkpoint = out / "train" / method / "checkpoints" / f"checkpoint-{step}"
        if not (checkpoint / CHECKPOINT_MARKER).exists():
            raise ManyICLError(f"{checkpoint}: the checkpoint of this budget point is missing or incomplete; train "
                               f"{method} again (--overwrite) with save_steps dividing step {step}")
        click.echo(f"== {method} at step {step} (budget point)")
        run_evaluation(early, [(t, role) for t, role in tasks if role != "forgetting"], method, str(checkpoint),
                       out / BUDGETS_DIR / f"step-{step}", shots=config.compare.budget_shots)


def compare(config: ExperimentConfig, only: list[str] | None = None, overwrite: bool = False,
            train_only: bool = False) -> Path | None:
    """Train and evaluate every method, then write the report; ``train_only``: the fine-tunes alone (a stage of a
    long run), no evaluation and no report (returns None)."""
    methods = list(only or config.compare.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ManyICLError(f"compare.methods: unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}")
    if not config.tasks.held_out:
        raise ManyICLError("tasks.held_out: list the tasks to evaluate on (never seen in fine-tuning)")
    if any(m in MIXTURE_METHODS for m in methods) and not config.tasks.meta_train:
        raise ManyICLError("tasks.meta_train: the fine-tuned methods need a meta-train mixture")
    check_split(config.tasks)
    steps = budget_steps(config) if any(m in MIXTURE_METHODS for m in methods) else []
    if not train_only:
        check_contexts(config.evaluation, config.model, config.evaluation_tokens,
                       [*config.evaluation.shots, *config.compare.task_level_shots, *config.compare.budget_shots])
    out = Path(config.output_dir)
    with run_lock(out):  # one process per run folder
        return _run_methods(config, methods, out, overwrite, train_only, steps)


def _run_methods(config: ExperimentConfig, methods: list[str], out: Path, overwrite: bool, train_only: bool,
                 steps: list[int]) -> Path | None:
    check_same_experiment(out, config, overwrite)
    # before any work: fine-tunes of two precisions, and an explicit precision other than the finished fine-tunes'
    # where one is left to train (only a training needs this machine to run its precision)
    trained_precision(out, config, training_here=still_to_train(config, methods, out))
    tasks = evaluation_tasks(config.tasks)  # held-out, forgetting and in-distribution tasks, with their roles
    held = [(t, role) for t, role in tasks if role == "held_out"]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare_config.yaml", dump_config(config))

    for method in methods:
        click.echo(f"== {method}")
        training = METHODS[method].training
        if training == "none":
            if not train_only:
                run_evaluation(config, tasks, method, None, out)
        elif training == "per_task":
            for task_config, (task, role) in zip(fine_tunes(config, method, out), held):
                adapter = train_stage(with_shared_precision(task_config, out))
                if not train_only:
                    run_evaluation(config, [(task, role)], method, str(adapter), out,
                                   shots=config.compare.task_level_shots)
        else:
            (mixture_config,) = fine_tunes(config, method, out)
            adapter = train_stage(with_shared_precision(mixture_config, out))
            if not train_only:
                run_evaluation(config, tasks, method, str(adapter), out)
                evaluate_budgets(config, tasks, method, out, steps)
    if train_only:
        return None

    from manyicl.model_card import card_from_run
    from manyicl.reporting import method_summaries, write_report

    report = write_report(out)
    for method, lines in method_summaries(out).items():  # each fine-tune's model card gets its evaluation
        if method in MIXTURE_METHODS:
            card_from_run(out / "train" / method, lines)
    click.echo(summary_table(json.loads((out / "results.json").read_text()), out))
    return report
