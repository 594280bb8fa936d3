"""Packed isolated units at full speed: each unit attends causally to itself only, without a dense mask.

Zero- and few-shot baselines pack several short units (one example, or a few demonstrations and a query) into
one row so that every method trains on the same tokens per step; positions restart at every unit. transformers
isolates such units with a dense block-diagonal mask, which takes SDPA off its causal fast path: packed rows ran
~50 % slower per token than many-shot rows. Here the attention runs per unit with ``is_causal=True`` (the units
are found where positions restart), which is exactly attention within each unit, the only attention a packed
unit may have, at the cost of the unit's own causal triangle.

Used only for packed training rows (no padding mask, positions restart); a model whose attention is not plain
SDPA over the whole context (sliding windows narrower than the row, other layer types) keeps transformers' mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from manyicl.models import windowed_attention

ATTENTION_NAME = "manyicl_packed_sdpa"


def unit_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every unit in one row: a unit starts where the position is 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def packed_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal SDPA within each unit of each row; query/key/value are (batch, heads, tokens, head_dim)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2]:  # not a packed training row: plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: SDPA's causal fast path takes no enable_gqa on every build
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    rows = []
    for row in range(query.shape[0]):
        pieces = [
            F.scaled_dot_product_attention(query[row : row + 1, :, s:e], key[row : row + 1, :, s:e], value[row : row + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling)
            for s, e in unit_bounds(position_ids[row if position_ids.shape[0] > 1 else 0])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Packed rows need no mask: the attention above isolates the units from the positions."""
    return None


def supports_packed_attention(model: Any, max_tokens: int) -> bool:
    """Plain SDPA over the whole row: no sliding window narrower than the row, one kind of attention layer."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    return windowed_attention(model, max_tokens) is None


@contextmanager
def packed_attention(model: Any, max_tokens: int) -> Iterator[bool]:
    """Within the block, the model attends within packed units without a dense mask (where it can: yields
    whether it does); the attention setting is restored afterwards, so nothing of it is saved with the weights."""
    if not supports_packed_attention(model, max_tokens):
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]
    for config in configs:
        config._attn_implementation = ATTENTION_NAME
    try:
        yield True
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
