"""The transformers backend: one prefix pass per cell, then many queries per forward on top of it.

``SharedPrefixBackend`` writes the prefix's keys/values once (``kv_store.InPlaceKV``). A group of queries,
sized by ``batch_tokens``, then runs in ONE forward after the prefix: every query sees the prefix and itself
only (a block mask over the group; positions restart at the prefix length), and each query's candidate
answers are laid out as a trie in the same forward (a candidate token sees its query and its own earlier
tokens; logits only where a candidate token is predicted). A label-set task costs one forward per group.
Generation decodes the group together: each step appends one token per unfinished query, and a query stops
at the answer delimiter or at any end-of-sequence id.

``NaiveBackend`` re-reads prefix + query for every query: the exact reference (``--no-prefix-cache``) and
the fallback for models whose cache cannot be reused exactly (sliding-window or non-SDPA attention).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from manyicl.evaluation.backend import Stop
from manyicl.evaluation.kv_store import InPlaceKV, gqa_attention
from manyicl.models import text_config, windowed_attention

MIN_GROUP_TOKENS = 512
# Scoring groups: every group token attends over the prefix AND the whole group under a block mask, so the masked
# part (the group's other queries) is wasted attention that grows with the group; ranked cells do one forward per
# group and nothing else, so smaller groups pay. SmolLM2 on CPU, agnews max shots, 60 queries, fastest of 2
# (bench/eval_groups.py): a cell with 512-token groups 1.13x faster than with 2,048 at a 2,048-token budget, 1.07x
# at 4,096 (prefix pass included); 256 no better. Generation keeps group_budget: its decode steps batch the
# group's queries, and 2,048-token groups were 1.2x faster there than 512 (mawps, lama_P36).
SCORE_GROUP_TOKENS = 512


def exact_reuse_problem(model: Any, max_tokens: int) -> str | None:
    """Why a shared prefix with a block mask would not reproduce the plain forward for this model, if it would not."""
    problem = windowed_attention(model, max_tokens)
    if problem:
        return problem
    config = text_config(model.config)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (needs sdpa or eager for a custom mask)"
    return None


def hf_backend(model: Any, tokenizer: Any, max_tokens: int, prefix_cache: bool = True, batch_tokens: int = 2048) -> Any:
    """The fast backend when it is exact for this model, else the naive one with a one-line notice."""
    if prefix_cache:
        problem = exact_reuse_problem(model, max_tokens)
        if problem is None:
            return SharedPrefixBackend(model, tokenizer, batch_tokens)
        warnings.warn(f"evaluation: {problem}: the shared prefix cannot be reused exactly; using the exact path "
                      f"(prefix re-encoded per query)", stacklevel=2)
    return NaiveBackend(model, tokenizer, batch_tokens)


def _groups(sizes: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive indices whose sizes sum to at most ``budget`` (at least one per group)."""
    group, used = [], 0
    for i, size in enumerate(sizes):
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(i)
        used += size
    if group:
        yield group


def _stopped(tokenizer: Any, generated: list[int], token: int, stop: Stop) -> bool:
    """Greedy decoding's rule: an end-of-sequence id ends it (not kept); so does the delimiter (kept, then cut)."""
    if token in stop.token_ids:
        return True
    generated.append(token)
    return bool(stop.text) and stop.text in tokenizer.decode(generated)


class _Layout:
    """The tokens after the prefix in the current group: each one's parent (-1: the prefix), depth, visibility."""

    def __init__(self, prefix_length: int, capacity: int):
        self.prefix_length = prefix_length
        self.depth: list[int] = []
        self.visible = torch.zeros(capacity, capacity, dtype=torch.bool)  # [slot, earlier slot]: attends to it
        self.tokens: list[int] = []  # written since the last forward
        self.first_new = 0

    def add(self, token: int, parent: int) -> int:
        slot = len(self.depth)
        self.depth.append(self.depth[parent] + 1 if parent >= 0 else 0)
        if parent >= 0:
            self.visible[slot] = self.visible[parent]
        self.visible[slot, slot] = True
        self.tokens.append(token)
        return slot

    def inputs(self, dtype: torch.dtype, device: Any) -> dict[str, torch.Tensor]:
        """The new tokens, their positions (prefix length + depth) and their mask over prefix + group so far."""
        new = range(self.first_new, len(self.depth))
        end = len(self.depth)
        mask = torch.zeros(len(new), self.prefix_length + end, dtype=dtype)
        mask[:, self.prefix_length :].masked_fill_(~self.visible[self.first_new : end, :end], torch.finfo(dtype).min)
        positions = [self.prefix_length + self.depth[s] for s in new]
        ids = self.tokens
        self.tokens, self.first_new = [], end
        return {
            "input_ids": torch.tensor([ids], device=device),
            "position_ids": torch.tensor([positions], device=device),
            "attention_mask": mask[None, None].to(device),
        }


class SharedPrefixBackend:
    def __init__(self, model: Any, tokenizer: Any, batch_tokens: int = 2048):
        self.model, self.tokenizer, self.batch_tokens = model, tokenizer, batch_tokens
        self.score_group_tokens = min(batch_tokens, SCORE_GROUP_TOKENS)
        self._prefix: tuple[int, ...] | None = None
        self._store: InPlaceKV | None = None

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _store_with(self, prefix: list[int]) -> InPlaceKV:
        """The store holding ``prefix``; computed once per distinct prefix (once per cell). A server keeps many
        (serving/prefix_cache.py overrides this)."""
        if self._prefix != tuple(prefix):
            self._store = self.encode_prefix(prefix)
            self._prefix = tuple(prefix)
        return self._store

    def encode_prefix(self, prefix: list[int]) -> InPlaceKV:
        """One forward over ``prefix``: its keys/values, with room for a group of queries after them."""
        config = text_config(self.model.config)
        store = InPlaceKV(config.num_hidden_layers)
        store.reserve(len(prefix) + self.batch_tokens)
        if prefix:
            self.model(input_ids=torch.tensor([prefix], device=self.device), cache=store, use_cache=True,
                       logits_to_keep=1)
        return store

    def group_budget(self, prefix_length: int) -> int:
        """Tokens per group in generation. Each group token attends over prefix + group under a block mask, so the
        masked part (other queries of the group) is wasted work: for a short prefix, small groups; for a long one,
        decoding the group's queries together (one token each per step) pays more."""
        return min(self.batch_tokens, max(MIN_GROUP_TOKENS, prefix_length))

    def _forward(self, store: InPlaceKV, layout: _Layout, keep: list[int]) -> torch.Tensor:
        """Run the layout's new tokens; log-probabilities at the slots in ``keep`` (in that order)."""
        first = layout.first_new
        inputs = layout.inputs(self.dtype, self.device)
        rows = torch.tensor([s - first for s in keep], device=self.device)
        out = self.model(**inputs, cache=store, use_cache=True, logits_to_keep=rows)
        return torch.log_softmax(out.logits[0].float(), -1)

    @torch.inference_mode()
    def score(self, prefix: list[int], queries: list[list[int]],
              candidates: list[list[list[int]]]) -> list[list[list[float]]]:
        results: list[list[list[float]]] = [[] for _ in queries]
        if not queries:
            return results
        with gqa_attention(self.model):
            store = self._store_with(prefix)
            sizes = [len(q) + _trie_size(c) for q, c in zip(queries, candidates)]
            for group in _groups(sizes, self.score_group_tokens):
                layout = _Layout(len(prefix), sum(sizes[i] for i in group))
                store.reserve(len(prefix) + sum(sizes[i] for i in group))
                predictors = {i: _add_query(layout, queries[i], candidates[i]) for i in group}
                keep = sorted({s for i in group for slots in predictors[i] for s in slots})
                row = {s: k for k, s in enumerate(keep)}
                logp = self._forward(store, layout, keep)
                for i in group:
                    results[i] = [[logp[row[s], t].item() for s, t in zip(slots, cand)]
                                  for slots, cand in zip(predictors[i], candidates[i])]
                store.crop(len(prefix))
        return results

    @torch.inference_mode()
    def generate(self, prefix: list[int], queries: list[list[int]], stop: Stop) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in queries]
        if not queries or stop.max_new_tokens <= 0:
            return results
        with gqa_attention(self.model):
            store = self._store_with(prefix)
            sizes = [len(q) + stop.max_new_tokens for q in queries]
            for group in _groups(sizes, self.group_budget(len(prefix))):
                capacity = sum(sizes[i] for i in group)
                layout = _Layout(len(prefix), capacity)
                store.reserve(len(prefix) + capacity)
                last = {}
                for i in group:
                    slot = -1
                    for token in queries[i]:
                        slot = layout.add(token, slot)
                    last[i] = slot
                active = list(group)
                for step in range(stop.max_new_tokens):
                    logp = self._forward(store, layout, [last[i] for i in active])
                    tokens = logp.argmax(-1).tolist()
                    active_next = []
                    for i, token in zip(active, tokens):
                        if not _stopped(self.tokenizer, results[i], token, stop):
                            active_next.append(i)
                    active = active_next
                    if not active or step == stop.max_new_tokens - 1:
                        break
                    for i in active:
                        last[i] = layout.add(results[i][-1], last[i])
                store.crop(len(prefix))
        return results


def _trie_size(candidates: list[list[int]]) -> int:
    """Tokens the candidates add as a trie: every distinct proper prefix of length >= 1."""
    return len({tuple(c[:t]) for c in candidates for t in range(1, len(c))})


def _add_query(layout: _Layout, query: list[int], candidates: list[list[int]]) -> list[list[int]]:
    """Lay out a query and its candidates' trie; per candidate token, the slot whose logits predict it."""
    slot = -1
    for token in query:
        slot = layout.add(token, slot)
    nodes: dict[tuple[int, ...], int] = {(): slot}
    predictors = []
    for cand in candidates:
        for t in range(1, len(cand)):
            if tuple(cand[:t]) not in nodes:
                nodes[tuple(cand[:t])] = layout.add(cand[t - 1], nodes[tuple(cand[: t - 1])])
        predictors.append([nodes[tuple(cand[:t])] for t in range(len(cand))])
    return predictors


class NaiveBackend:
    """Every query re-reads the whole prefix: slow, and the reference the shared-prefix path must equal."""

    def __init__(self, model: Any, tokenizer: Any, batch_tokens: int = 2048):
        self.model, self.tokenizer, self.batch_tokens = model, tokenizer, batch_tokens

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def score(self, prefix: list[int], queries: list[list[int]],
              candidates: list[list[list[int]]]) -> list[list[list[float]]]:
        results = []
        for query, cands in zip(queries, candidates):
            base = prefix + query
            per_forward = max(1, self.batch_tokens // (len(base) + max(len(c) for c in cands)))
            scores: list[list[float]] = []
            for chunk in range(0, len(cands), per_forward):
                group = cands[chunk : chunk + per_forward]
                width = len(base) + max(len(c) for c in group)
                ids = torch.tensor([base + c + [c[-1]] * (width - len(base) - len(c)) for c in group],
                                   device=self.device)
                keep = torch.zeros_like(ids, dtype=torch.bool)
                for k, c in enumerate(group):  # logits only where candidate tokens are predicted
                    keep[k, len(base) - 1 : len(base) - 1 + len(c)] = True
                logp = torch.log_softmax(self.model(input_ids=ids, logits_to_keep=keep,
                                                    use_cache=False).logits.float(), -1)
                pos = 0
                for c in group:
                    scores.append([logp[pos + t, c[t]].item() for t in range(len(c))])
                    pos += len(c)
            results.append(scores)
        return results

    @torch.inference_mode()
    def generate(self, prefix: list[int], queries: list[list[int]], stop: Stop) -> list[list[int]]:
        results = []
        for query in queries:
            out = self.model(input_ids=torch.tensor([prefix + query], device=self.device), use_cache=True,
                             logits_to_keep=1)
            generated: list[int] = []
            for step in range(stop.max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                if _stopped(self.tokenizer, generated, token, stop) or step == stop.max_new_tokens - 1:
                    break
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=out.cache,
                                 use_cache=True, logits_to_keep=1)
            results.append(generated)
        return results
