"""Evaluation prompts as token ids: which demonstrations, and how prefix, query and answers tokenize.

Backend agnostic: the output is plain token ids. The text comes from the same Formatter as training, and
every piece is tokenized IN CONTEXT exactly as it appears in the full prompt (tokenizers merge across
boundaries), so ``prefix + query + answer`` always equals tokenizing the whole text; this is checked once
per cell.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

from manyicl.errors import ManyICLError
from manyicl.formatter import Formatter
from manyicl.sequences import leading_special_ids, tokenize_spans
from manyicl.tasks import RANKED_FAMILIES, Example, Task, take_fitting

MAX_NEW_TOKENS = {"qa": 32, "math": 16, "summarization": 96, "generation": 64, "multilabel": 32}


@dataclass
class EncodedQuery:
    ids: list[int]
    candidates: list[list[int]]  # ranked families: each label's answer tokens (answer + delimiter), in context


def check_shots(task: Task, shots: int | str) -> None:
    if shots != "max" and shots > len(task.train):
        raise ManyICLError(f"task {task.name}: shots={shots} is larger than its train split ({len(task.train)} examples); lower it")


class Prompter:
    """The prompts of one task under one context budget."""

    def __init__(self, task: Task, tokenizer: Any, formatter: Formatter, max_tokens: int, max_new_tokens: int | None = None):
        self.task, self.tokenizer, self.formatter, self.max_tokens = task, tokenizer, formatter, max_tokens
        self.ranked = task.family in RANKED_FAMILIES
        self.labels = tuple(task.labels or ())
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS.get(task.family, 64)
        self.lead = leading_special_ids(tokenizer)
        self._costs: dict[int, int] = {}

    # ---- demonstrations
    def example_tokens(self, index: int) -> int:
        """Token count of one train example (prompt + answer) on its own; a close estimate of its cost in context."""
        if index not in self._costs:
            ex = self.task.train[index]
            text = self.formatter.prompt(ex.input) + self.formatter.answer(ex.output)
            self._costs[index] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._costs[index]

    def choose_demonstrations(self, shots: int | str, seed: int, balance: bool, queries: list[Example]) -> list[Example]:
        """The first ``shots`` examples of the seeded order that fit next to the longest query that fits at all."""
        check_shots(self.task, shots)
        order = self.task.order(random.Random(f"eval:{self.task.name}:{seed}"), balance)
        wanted = order if shots == "max" else order[:shots]
        reserve = 0
        for q in queries:
            need = self.query_budget(self.encode_query("", q.input))
            if need + len(self.lead) <= self.max_tokens:
                reserve = max(reserve, need)
        header = self.tokenizer(self.formatter.header, add_special_tokens=False)["input_ids"]
        budget = self.max_tokens - reserve - len(self.lead) - len(header)
        chosen = [self.task.train[i] for i in take_fitting(wanted, self.example_tokens, budget)]
        # token counts of separate examples can differ slightly in context: trim until the prefix really fits
        while chosen and len(self.prefix_ids(chosen)) > self.max_tokens - reserve:
            chosen.pop()
        if shots != "max" and len(chosen) < shots:
            warnings.warn(f"{self.task.name}: only {len(chosen)} of {shots} demonstrations fit in {self.max_tokens} tokens", stacklevel=2)
        return chosen

    # ---- token ids
    def prefix_ids(self, demos: list[Example]) -> list[int]:
        """Lead special tokens + header + demonstrations: what every query of the cell shares."""
        rendered = self.formatter.render(demos)  # ends with the continuation: the last delimiter tokenizes as in training
        prefix_len = len(rendered.text) - len(self.formatter.continuation)
        if prefix_len == 0:
            return list(self.lead)
        ids, spans = tokenize_spans(self.tokenizer, rendered.text, [(0, prefix_len)], self.lead)
        return ids[: spans[0][1]]

    def context(self, demos: list[Example]) -> str:
        """The text that decides how a query tokenizes: the last demonstration (or the header)."""
        rendered = self.formatter.render(demos)
        prefix_text = rendered.text[: len(rendered.text) - len(self.formatter.continuation)]
        return prefix_text[rendered.example_spans[-1][0] :] if demos else prefix_text

    def encode_query(self, context: str, query: str) -> EncodedQuery:
        """Token ids of the query prompt and of each candidate answer as they appear after ``context``."""
        prompt = self.formatter.prompt(query)
        answers = [self.formatter.answer(c) for c in self.labels] if self.ranked else [""]
        query_ids, candidates = None, []
        for a in answers:
            start = len(context)
            spans = [(start, start + len(prompt))] + ([(start + len(prompt), start + len(prompt) + len(a))] if a else [])
            ids, tspans = tokenize_spans(self.tokenizer, context + prompt + a + self.formatter.continuation, spans)
            q = ids[tspans[0][0] : tspans[0][1]]
            if query_ids is not None and q != query_ids:
                raise ManyICLError(f"task {self.task.name}: the query tokenizes differently before different answers; change the template")
            query_ids = q
            if len(tspans) > 1:
                candidates.append(ids[tspans[1][0] : tspans[1][1]])
        return EncodedQuery(query_ids, candidates)

    def query_budget(self, query: EncodedQuery) -> int:
        """Tokens one query needs after the prefix: its prompt and its longest possible answer."""
        answer = max((len(c) for c in query.candidates), default=0) if self.ranked else self.max_new_tokens
        return len(query.ids) + answer

    def check_in_context(self, demos: list[Example], prefix: list[int], query: Example, encoded: EncodedQuery) -> None:
        """Once per cell: the pieces must equal tokenizing the whole prompt at once."""
        rendered = self.formatter.render(demos)
        prefix_text = rendered.text[: len(rendered.text) - len(self.formatter.continuation)]
        answer = self.formatter.answer(self.labels[0]) if self.ranked and self.labels else ""
        full = self.tokenizer(prefix_text + self.formatter.prompt(query.input) + answer + self.formatter.continuation,
                              add_special_tokens=False)["input_ids"]
        pieces = prefix[len(self.lead) :] + encoded.ids + (encoded.candidates[0] if answer else [])
        if full[: len(pieces)] != pieces:
            raise ManyICLError(f"task {self.task.name}: prefix and query do not tokenize as the full prompt; change the template")
