"""What an evaluation backend does: given ONE prefix and many queries, score candidates or generate.

Everything before this point (which demonstrations, how text becomes token ids) is backend agnostic
(``prompting.py``); everything after it (metrics, results) too (``cells.py``, ``runner.py``). A backend only
runs a model. ``backend_hf.py`` is the transformers one; docs/EVALUATION.md says how to add another (vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Stop:
    """When greedy decoding of one answer ends: at any of ``token_ids`` (not kept), or once ``text`` appears."""

    token_ids: frozenset[int]
    text: str
    max_new_tokens: int


class Backend(Protocol):
    def score(self, prefix: list[int], queries: list[list[int]],
              candidates: list[list[list[int]]]) -> list[list[list[float]]]:
        """For query q and candidate c: the log-probability of each token of ``candidates[q][c]``, predicted
        after ``prefix + queries[q]`` and the candidate's earlier tokens."""
        ...

    def generate(self, prefix: list[int], queries: list[list[int]], stop: Stop) -> list[list[int]]:
        """For every query, the greedily decoded token ids after ``prefix + query``, up to ``stop``."""
        ...
