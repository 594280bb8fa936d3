"""A key/value store written in place, and grouped-query attention that never repeats keys/values.

One evaluation cell shares one prefix (header + demonstrations). Its keys/values are written ONCE into
buffers preallocated per layer; every later forward (a group of queries, a decoding step) writes its
keys/values after them, and "crop" only moves the length back. Nothing of the prefix is ever copied per
query, per candidate or per generated token: the attention reads views of the buffers.

transformers' SDPA path repeats the key/value heads for grouped-query attention whenever a mask is given
(``repeat_kv``: a fresh copy of every cached key per layer per forward). SDPA's own ``enable_gqa`` computes
the same thing from the unrepeated heads; ``bench/eval_throughput.py`` measures it against folding the query
heads into the sequence (equal within noise) and against ``repeat_kv`` (slower); it is the simpler of the two.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from manyicl.models import sdpa_replaced

ATTENTION_NAME = "manyicl_sdpa"


class InPlaceLayer(CacheLayerMixin):
    """One layer's keys/values in buffers that grow only when a forward needs more room than ever before."""

    is_croppable = True
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.capacity = 0
        self.reserved = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True
        self._allocate(max(self.reserved, key_states.shape[-2]), key_states, value_states)

    def _allocate(self, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        new_keys = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        new_values = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        if self.length:  # only when a later forward needs more room than the cell reserved: one copy
            new_keys[..., : self.length, :] = self._keys[..., : self.length, :]
            new_values[..., : self.length, :] = self._values[..., : self.length, :]
        self._keys, self._values, self.capacity = new_keys, new_values, capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._allocate(max(end, self.reserved, 2 * self.capacity), key_states, value_states)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (an absolute length, not a count to remove)."""
        self.length = min(self.length, length)


class InPlaceKV(Cache):
    """The per-cell store: the shared prefix, then whatever the current forward appended."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[InPlaceLayer() for _ in range(num_layers)])

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions in every layer, allocated at the next write if not there yet."""
        for layer in self.layers:
            layer.reserved = max(layer.reserved, total)

    def crop(self, length: int) -> None:  # type: ignore[override]
        for layer in self.layers:
            layer.crop(length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (their capacity, not only the length in use)."""
        return sum(t.nelement() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer._keys, layer._values))


def gqa_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked grouped-query forward uses SDPA's own GQA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def gqa_attention(model: Any) -> Iterator[None]:
    """Run an SDPA model with :func:`gqa_sdpa_attention` for the duration of the block (other kinds unchanged)."""
    from transformers.masking_utils import sdpa_mask

    with sdpa_replaced(model, ATTENTION_NAME, gqa_sdpa_attention, sdpa_mask):
        yield
