"""The prefix cache: each served task's key/value prefix kept in memory up to a byte budget, least recently used
out first. An evicted task is encoded again on its next request, transparently (the same ids give the same
keys/values, so the same predictions)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from manyicl.evaluation.backend_hf import SharedPrefixBackend
from manyicl.evaluation.kv_store import InPlaceKV


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class PrefixCache:
    """prefix ids -> their keys/values; ``budget_bytes`` bounds the buffers held between requests (the request in
    flight holds its own entry while it runs, so an entry over the budget, or a budget of 0, means a prefix encoded
    per request: the server without a cache that bench/serve_load.py compares with)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], InPlaceKV] = OrderedDict()
        self.stats = CacheStats()

    def get(self, prefix: tuple[int, ...]) -> InPlaceKV | None:
        store = self._entries.get(prefix)
        if store is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._entries.move_to_end(prefix)
        return store

    def put(self, prefix: tuple[int, ...], store: InPlaceKV) -> None:
        self._entries[prefix] = store
        self._entries.move_to_end(prefix)
        self.trim()

    def trim(self) -> None:
        """Evict from the least recently used end until the budget holds (buffers can grow while in use)."""
        while self._entries and self.nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def discard(self, prefix: tuple[int, ...]) -> None:
        self._entries.pop(prefix, None)

    def __contains__(self, prefix: tuple[int, ...]) -> bool:
        return prefix in self._entries

    def bytes_of(self, prefix: tuple[int, ...]) -> int:
        store = self._entries.get(prefix)
        return store.nbytes if store is not None else 0

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class CachedPrefixBackend(SharedPrefixBackend):
    """The evaluation backend, with the prefixes of many tasks kept in a :class:`PrefixCache` instead of one."""

    def __init__(self, model: Any, tokenizer: Any, cache: PrefixCache, batch_tokens: int = 1024):
        super().__init__(model, tokenizer, batch_tokens)
        self.cache = cache
        self.last_hit = False

    def _store_with(self, prefix: list[int]) -> InPlaceKV:
        key = tuple(prefix)
        store = self.cache.get(key)
        self.last_hit = store is not None
        if store is None:
            store = self.encode_prefix(prefix)
            self.cache.put(key, store)
        return store
