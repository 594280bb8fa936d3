"""The training data: one SequenceBuilder per task, the mixture over tasks, and batches for the Trainer.

Sequence i of a run is a deterministic function of (seed, i), so a resumed or multi-rank run trains on exactly
the sequences an uninterrupted single-process run would.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from manyicl.config import ExperimentConfig
from manyicl.formatter import Formatter
from manyicl.sequences import IGNORE_INDEX, SequenceBuilder
from manyicl.tasks import Task


def make_builders(config: ExperimentConfig, tasks: list[Task], tokenizer: Any) -> dict[str, SequenceBuilder]:
    tr = config.training
    builders = {}
    for task in tasks:
        formatter = Formatter.for_task(task, tokenizer, chat=config.format.chat, **config.format.template)
        builders[task.name] = SequenceBuilder(
            task, tokenizer, formatter, tr.max_tokens, tr.objective, tr.n_shots, tr.balance_labels
        )
    return builders


def mixture_weights(tasks: list[Task], temperature: float, cap: int | None) -> dict[str, float]:
    """P(task) ∝ min(size, cap) ** (1 / temperature): proportional to size at T=1, uniform as T grows."""
    raw = {t.name: min(len(t.train), cap or len(t.train)) ** (1.0 / temperature) for t in tasks}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


class MixtureDataset(torch.utils.data.Dataset):
    """Sequence i is a deterministic function of (seed, i): its task is drawn from the mixture weights and its
    examples from that task. Built lazily, so a run of any length starts at once and any rank can build any item."""

    def __init__(self, builders: dict[str, SequenceBuilder], weights: dict[str, float], n_sequences: int, seed: int, pack: bool):
        self.builders, self.seed, self.n = builders, seed, n_sequences
        self.names = sorted(builders)
        self.weights = [weights[n] for n in self.names]
        # rows of packed isolated units (zero/few-shot): positions restart at every unit
        self.packed = pack and any(b.spec.isolated for b in builders.values())

    def __len__(self) -> int:
        return self.n

    def task_of(self, i: int) -> str:
        return random.Random(f"mixture:{self.seed}:{i}").choices(self.names, self.weights)[0]

    def undrawn_tasks(self) -> list[str]:
        """Tasks that no sequence of the run draws: the draws are fixed by the seed, so this is known before
        training. Stops at the first draw that completes the set (at once for any run long enough)."""
        missing = set(self.names)
        for i in range(self.n):
            missing.discard(self.task_of(i))
            if not missing:
                break
        return sorted(missing)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.task_of(i)
        builder = self.builders[name]
        seed = self.seed * 1_000_003 + i
        seq = builder.build_packed(seed) if self.packed and builder.spec.isolated else builder.build(seed)
        return {
            "input_ids": seq.input_ids,
            "labels": seq.labels,
            "target_index": seq.target_index(),
            "position_ids": seq.position_ids,
            "sequence_id": i,
            "task_id": self.names.index(name),
        }


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad. Packed items carry position_ids and no attention mask (positions restart at every unit, which
    isolates the units: packing.py); their padding restarts positions too, so it is a separate, unsupervised block."""
    width = max(len(it["input_ids"]) for it in items)
    packed = items[0]["position_ids"] is not None

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([it[key] + [value] * (width - len(it[key])) for it in items])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "target_index": pad("target_index", -1),
        "sequence_id": torch.tensor([it["sequence_id"] for it in items]),
        "task_id": torch.tensor([it["task_id"] for it in items]),
    }
    if packed:
        batch["position_ids"] = torch.tensor([it["position_ids"] + list(range(width - len(it["position_ids"]))) for it in items])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"])) for it in items])
    return batch


def steps_for_epochs(tasks, builders, weights, epochs, per_step, cap) -> int:
    """Optimizer steps so that, in expectation, each task's (capped) examples are seen ``epochs`` times."""
    examples = sum(min(len(t.train), cap or len(t.train)) for t in tasks)
    per_sequence = sum(weights[t.name] * builders[t.name].build(0).n_examples for t in tasks)
    return max(1, math.ceil(epochs * examples / per_sequence / per_step))
