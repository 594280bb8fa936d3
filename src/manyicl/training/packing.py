"""Packed isolated units: each unit attends causally to itself only, by construction.

Zero- and few-shot baselines pack several short units (one example, or a few demonstrations and a query) into
one row so that every method trains on the same tokens per step; positions restart at every unit. Nothing here
relies on transformers inferring the units from the positions (with SDPA, no mask and transformers 5 it does not
always: units then attend to each other and silently become an in-context sequence). Instead, one of two ways:

- ``per_unit``: for plain SDPA over the whole row the attention runs within each unit with ``is_causal=True``
  (the units are found where positions restart; units of one length class batched into one call) — exactly
  attention within each unit, at full speed: a dense mask takes SDPA off its causal fast path (packed rows ran
  ~50 % slower per token than many-shot rows).
- ``mask``: for eager attention, or a sliding window that applies to every layer, an explicit block-diagonal
  causal mask (with the window) is handed to the model as a 4D mask, which transformers uses as given.

A model for which neither is exact (another attention implementation, layers of several kinds with a window
narrower than the row) is refused in one line before training (``packed_isolation``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from manyicl.errors import ManyICLError
from manyicl.models import sdpa_replaced, text_config, windowed_attention

ATTENTION_NAME = "manyicl_packed_sdpa"


def unit_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every unit in one row: a unit starts where the position is 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def length_groups(bounds: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The units of a row grouped by length class (lengths in (2^(j-1), 2^j]): each group runs as one padded SDPA
    call, padded at most to twice its shortest unit."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in bounds:
        groups.setdefault((e - s - 1).bit_length(), []).append((s, e))
    return [groups[j] for j in sorted(groups)]


def _grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              bounds: list[tuple[int, int]], dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention within each unit of one row; query/key/value are (heads, tokens, head_dim).

    Units of one length class are gathered into a right-padded batch and attended in one causal SDPA call. Causal
    masking alone is exact there: a real query never reaches the padding after it, and what the padded queries
    compute is dropped (so no gradient flows into the padding). One call per unit instead made rows of many short
    units slow: a row of 138 one-fact units ran 2.2x slower than grouped (bench/packed_attention.py)."""
    tokens, outputs = [], []
    device = query.device  # the index tensors live with the activations (a GPU gathers with its own)
    for group in length_groups(bounds):
        width = max(e - s for s, e in group)
        offsets = torch.arange(width, device=device)
        starts = torch.tensor([s for s, _ in group], device=device)[:, None]
        lengths = torch.tensor([e - s for s, e in group], device=device)[:, None]
        index = starts + offsets.minimum(lengths - 1)  # (units, width): padding repeats the unit's last token
        real = offsets < lengths
        q, k, v = (t[:, index].transpose(0, 1) for t in (query, key, value))  # (units, heads, width, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        tokens.append(index[real])
        outputs.append(out.transpose(0, 1)[:, real])  # (heads, real tokens of the group, head_dim)
    order = torch.cat(tokens).argsort()  # every token of the row exactly once: back to the row's order
    return torch.cat(outputs, dim=1)[:, order]


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
    rows = [
        _grouped_causal_attention(query[row], key[row], value[row],
                                  unit_bounds(position_ids[row if position_ids.shape[0] > 1 else 0]), dropout, scaling)
        for row in range(query.shape[0])
    ]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Packed rows need no mask: the attention above isolates the units from the positions."""
    return None


def mask_window(model: Any, max_tokens: int) -> int | None:
    """The sliding window every layer applies within ``max_tokens`` (None: none narrower than the row); raises
    when the layers differ in a way that one mask cannot express."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_tokens or getattr(config, "use_sliding_window", True) is False:
        window = None
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    if kinds == {"full_attention", "sliding_attention"} and window is None:
        return None  # the window is at least as wide as the row: every layer attends the same way
    raise ManyICLError(f"training.pack: this model's layers attend in several ways ({', '.join(sorted(kinds))}"
                       f"{f', window {window}' if window else ''}), so one mask cannot isolate packed units in all of "
                       f"them; set training.pack=false (or training.max_tokens to at most the window)")


def packed_isolation(model: Any, max_tokens: int) -> str:
    """How packed units are kept apart for this model: "per_unit" or "mask" (module docstring); refuses otherwise."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == "sdpa" and windowed_attention(model, max_tokens) is None:
        return "per_unit"
    if implementation not in ("sdpa", "eager"):
        raise ManyICLError(f"training.pack: packed units are isolated only with sdpa or eager attention, "
                           f"and this model uses {implementation}; set training.pack=false or load the model "
                           "with sdpa attention")
    mask_window(model, max_tokens)  # raises where one mask cannot serve every layer
    return "mask"


def block_causal_mask(position_ids: torch.Tensor, window: int | None = None, additive_dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
    """(batch, 1, tokens, tokens): token q may attend to token k iff both are in the same unit (a unit starts where
    the position is 0) and 0 <= q - k < window. Boolean (True = attend) for SDPA; with ``additive_dtype``, 0 where
    allowed and the dtype's minimum elsewhere (eager attention adds the mask to its scores)."""
    unit = (position_ids == 0).cumsum(-1)
    same_unit = unit[:, :, None] == unit[:, None, :]
    q = torch.arange(position_ids.shape[-1], device=position_ids.device)
    distance = q[:, None] - q[None, :]
    allowed = same_unit & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def isolating_mask(model: Any, position_ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The explicit mask of the ``mask`` way for this model's attention implementation."""
    eager = model.config._attn_implementation == "eager"
    dtype = next(p.dtype for p in model.parameters()) if eager else None
    return block_causal_mask(position_ids, mask_window(model, max_tokens), dtype)


@contextmanager
def packed_attention(model: Any, max_tokens: int) -> Iterator[bool]:
    """Within the block, the model attends per packed unit without a dense mask where it can (``per_unit``; yields
    whether it does: otherwise the trainer hands it ``isolating_mask``); the attention setting is restored
    afterwards, so nothing of it is saved with the weights."""
    if packed_isolation(model, max_tokens) != "per_unit":
        yield False
        return
    with sdpa_replaced(model, ATTENTION_NAME, packed_sdpa_attention, _no_mask) as replaced:
        yield replaced
