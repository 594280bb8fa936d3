"""Target-only loss: project to the vocabulary only where an answer token is predicted.

A many-shot sequence of 4096 tokens may hold only a few hundred answer tokens. transformers' plain path
computes logits for every position (sequence x vocabulary, 49K wide for SmolLM2) and then ignores most of
them. Here the model gets a boolean ``logits_to_keep`` mask (a transformers API), so hidden states are
gathered first and the LM head runs only on supervised positions: logits memory scales with target tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from manyicl.sequences import IGNORE_INDEX


@dataclass
class LossStats:
    tokens: int
    target_tokens: int
    answers: int


def accepts_logits_to_keep(model: Any) -> bool:
    inner = getattr(model, "module", model)  # DDP wrapper
    inner = getattr(inner, "get_base_model", lambda: inner)()  # PEFT wrapper
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def supervised_count(batch: dict[str, torch.Tensor], normalization: str = "token") -> int:
    """What the loss is normalised by: supervised tokens (``token``) or answers (``target``) in the batch."""
    if normalization == "target":
        return int((batch["target_index"].max(dim=1).values + 1).sum())  # answers are numbered 0..k-1 per row
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def target_only_loss(model: Any, batch: dict[str, torch.Tensor], normalization: str = "token",
                     num_items: int | torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """Cross-entropy over answer tokens, summed and divided by ``num_items``.

    ``normalization="token"`` sums token losses; ``"target"`` sums each answer's mean token loss (every answer
    weighs the same). ``num_items`` is the count over the WHOLE optimizer step (every micro-batch, every rank:
    the Trainer's ``num_items_in_batch``), so the gradient does not depend on how the step is split; by default
    this batch's own count (``supervised_count``), i.e. the batch mean. A batch with nothing supervised gives 0.

    ``batch`` holds ``input_ids``, ``labels`` (aligned with inputs, -100 = unsupervised), ``target_index``
    (which answer each token belongs to, -1 = none) and optionally ``attention_mask`` / ``position_ids``.
    """
    labels = batch["labels"]
    # Logits at position p predict token p+1: keep p where labels[p+1] is supervised.
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    if accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (n_targets, vocab)
    else:  # a custom model without the API: same loss, full logits
        logits = model(**inputs, use_cache=False).logits[keep]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    # (row, answer) pairs identify answers across the batch
    answer_ids = batch["target_index"][:, 1:][keep[:, :-1]]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[:, 1:][keep[:, :-1]]
    answer_keys = rows * (int(batch["target_index"].max()) + 2) + answer_ids
    _, inverse, counts = torch.unique(answer_keys, return_inverse=True, return_counts=True)
    summed = (losses / counts[inverse]).sum() if normalization == "target" else losses.sum()
    if num_items is None:
        num_items = counts.numel() if normalization == "target" else targets.numel()
    loss = summed / (num_items.clamp(min=1) if torch.is_tensor(num_items) else max(num_items, 1))
    padding = batch.get("attention_mask")  # a 2D padding mask; packed rows (no mask, or a 4D one) have no padding
    tokens = int(padding.sum()) if padding is not None and padding.ndim == 2 else labels.numel()
    return loss, LossStats(tokens, int(targets.numel()), int(counts.numel()))


def full_logits_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' plain causal-LM loss (logits at every position); the reference for tests and benchmarks."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    return model(**inputs, labels=batch["labels"], use_cache=False).loss
