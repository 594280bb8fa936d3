"""Which tasks a config names: resolving each entry (a directory, a file, a hub dataset or a generated task)
and checking the meta-train / held-out split. Above tasks.py and synthetic.py, so neither imports the other,
and the CLI and compare resolve tasks without importing the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from manyicl.config import TasksConfig
from manyicl.errors import ManyICLError
from manyicl.synthetic import make_task
from manyicl.task_files import load_hf_task, load_task_dir, load_task_file
from manyicl.tasks import Task


def task_name(ref: Any) -> str:
    return ref if isinstance(ref, str) else ref.name


def resolve_task(ref: Any, data_dir: str | None = None, max_train: int | None = None, synthetic_seed: int = 0) -> Task:
    """A task from a config entry: a bare name (a directory under ``data_dir``) or a TaskSpec."""
    if isinstance(ref, str):
        if data_dir is None:
            raise ManyICLError(f"task {ref!r}: set tasks.data_dir, or give the task as a mapping with a path")
        task = load_task_dir(Path(data_dir) / ref, name=ref)
    elif ref.synthetic:
        task = make_task(ref.name, seed=synthetic_seed)
    else:
        extra = {"metric": ref.metric, "labels": ref.labels}
        extra = {k: v for k, v in extra.items() if v}
        if ref.dataset:
            task = load_hf_task(
                ref.dataset, ref.name, ref.family or "generation", ref.dataset_config, ref.train_split,
                ref.test_split, ref.data_files, ref.input_field, ref.output_field, ref.answers_field,
                template=ref.template, **extra,
            )
        elif ref.path and Path(ref.path).is_dir():
            task = load_task_dir(ref.path, name=ref.name, family=ref.family, template=ref.template, **extra)
        elif ref.path:
            task = load_task_file(
                ref.path, ref.name, ref.family or "generation", ref.test_path, ref.input_field, ref.output_field,
                ref.answers_field, template=ref.template, **extra,
            )
        elif data_dir is not None:
            task = load_task_dir(Path(data_dir) / ref.name, name=ref.name, family=ref.family,
                                 template=ref.template, **extra)
        else:
            raise ManyICLError(f"task {ref.name!r}: give a path, a dataset, synthetic: true, or set tasks.data_dir")
    if max_train is not None:
        task.train = task.train[:max_train]
    return task


def load_tasks(tasks_config: TasksConfig, refs: list[Any]) -> list[Task]:
    t = tasks_config
    return [resolve_task(r, t.data_dir, t.max_train_examples, t.synthetic_seed) for r in refs]


def evaluation_tasks(tasks_config: TasksConfig) -> list[tuple[Task, str]]:
    """Every task an evaluation covers, with its role: held-out, forgetting and in-distribution (mixture) tasks."""
    t = tasks_config
    return [(task, role) for refs, role in ((t.held_out, "held_out"), (t.forgetting, "forgetting"),
                                            (t.in_distribution, "in_distribution"))
            for task in load_tasks(t, refs)]


def check_split(tasks_config: TasksConfig) -> None:
    train = [task_name(r) for r in tasks_config.meta_train]
    held_out = [task_name(r) for r in tasks_config.held_out]
    stray = [t for t in tasks_config.distance if t not in held_out]
    if stray:
        raise ManyICLError(f"tasks.distance: {stray[0]!r} is not a held-out task; list it under tasks.held_out "
                           "or drop it")
    if tasks_config.distance and len(tasks_config.distance) < len(held_out):
        missing = next(t for t in held_out if t not in tasks_config.distance)
        raise ManyICLError(f"tasks.distance: held-out task {missing!r} has no label; say near or far for every "
                           "held-out task")
    outside = [t for t in (task_name(r) for r in tasks_config.in_distribution) if t not in train]
    if outside:
        raise ManyICLError(f"tasks.in_distribution: {outside[0]!r} is not in tasks.meta_train; in-distribution "
                           f"tasks are mixture tasks (their test splits show what each fine-tune learned)")
    held = [task_name(r) for r in tasks_config.held_out] + [task_name(r) for r in tasks_config.forgetting]
    both = sorted(set(train) & set(held))
    if both and not tasks_config.allow_overlap:
        raise ManyICLError(
            f"tasks: {both[0]!r} is in both meta_train and held_out/forgetting; held-out tasks must be unseen in "
            f"fine-tuning (set tasks.allow_overlap=true to allow it)"
        )
