"""The training data: one SequenceBuilder per task, the mixture over tasks, and batches for the Trainer.

Sequence i of a run is a deterministic function of (seed, i), so a resumed or multi-rank run trains on exactly
the sequences an uninterrupted single-process run would.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import torch

from manyicl.config import FormatConfig
from manyicl.sequences import IGNORE_INDEX, SequenceBuilder
from manyicl.tasks import Task


def make_builders(tasks: list[Task], tokenizer: Any, fmt: FormatConfig, max_tokens: int, objective: str,
                  n_shots: int) -> dict[str, SequenceBuilder]:
    """One builder per task: its sequences of ``max_tokens`` under ``objective``, in the task's one formatter."""
    return {task.name: SequenceBuilder(task, tokenizer, fmt.formatter(task, tokenizer), max_tokens, objective, n_shots)
            for task in tasks}


def mixture_weights(tasks: list[Task], temperature: float, cap: int | None) -> dict[str, float]:
    """P(task) ∝ min(size, cap) ** (1 / temperature): proportional to size at T=1, uniform as T grows."""
    raw = {t.name: min(len(t.train), cap or len(t.train)) ** (1.0 / temperature) for t in tasks}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


def mixture_quotas(weights: dict[str, float], n_sequences: int) -> dict[str, int]:
    """Sequences per task: ``n_sequences`` x weight rounded by largest remainder, at least one per task, so every
    listed task is trained on (independent draws gave two of twelve tasks no sequence in a 100-step run). A run
    with fewer sequences than tasks gives one each to the heaviest tasks, with a warning naming the others."""
    names = sorted(weights)
    if n_sequences < len(names):
        heaviest = sorted(names, key=lambda t: -weights[t])[:n_sequences]
        left_out = [t for t in names if t not in heaviest]
        warnings.warn(f"training.max_steps: the run has {n_sequences} sequences, too few for the {len(names)} mixture "
                      f"tasks, so none for {', '.join(left_out)}; raise training.max_steps (or batch_size) to at least "
                      f"{len(names)} sequences to train on every task", stacklevel=3)
        return {t: int(t in heaviest) for t in names}
    exact = {t: n_sequences * weights[t] for t in names}
    counts = {t: max(1, math.floor(exact[t])) for t in names}
    while sum(counts.values()) < n_sequences:  # the largest remainders get one more
        counts[max(names, key=lambda t: exact[t] - counts[t])] += 1
    while sum(counts.values()) > n_sequences:  # the minimum of one overshot: the smallest remainders give one back
        counts[min((t for t in names if counts[t] > 1), key=lambda t: exact[t] - counts[t])] -= 1
    return counts


class MixtureDataset(torch.utils.data.Dataset):
    """Sequence i is a deterministic function of (seed, i): its task comes from a seeded random interleaving of
    the tasks' quotas (``mixture_quotas``), its examples from that task. Built lazily, so a run of any length
    starts at once and any rank can build any item."""

    def __init__(self, builders: dict[str, SequenceBuilder], weights: dict[str, float], n_sequences: int, seed: int,
                 pack: bool):
        self.builders, self.seed, self.n = builders, seed, n_sequences
        self.names = sorted(builders)
        self.quotas = mixture_quotas({n: weights[n] for n in self.names}, n_sequences)
        self.assignment = [name for name in self.names for _ in range(self.quotas[name])]
        random.Random(f"mixture:{seed}").shuffle(self.assignment)
        # rows of packed isolated units (zero/few-shot): positions restart at every unit
        self.packed = pack and any(b.spec.isolated for b in builders.values())

    def __len__(self) -> int:
        return self.n

    def task_of(self, i: int) -> str:
        return self.assignment[i]

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
        batch["position_ids"] = torch.tensor([it["position_ids"] + list(range(width - len(it["position_ids"])))
                                              for it in items])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"]))
                                                for it in items])
    return batch


def steps_for_epochs(tasks, builders, weights, epochs, per_step, cap) -> int:
    """Optimizer steps so that, in expectation, each task's (capped) examples are seen ``epochs`` times."""
    examples = sum(min(len(t.train), cap or len(t.train)) for t in tasks)
    per_sequence = sum(weights[t.name] * builders[t.name].build(0).n_examples for t in tasks)
    return max(1, math.ceil(epochs * examples / per_sequence / per_step))
