"""Evaluation prompts as token ids: which demonstrations, and how prefix, query and answers tokenize.

Backend agnostic: the output is plain token ids. The text comes from the same Formatter as training, and
every piece is tokenized IN CONTEXT exactly as it appears in the full prompt (tokenizers merge across
boundaries), so ``prefix + query + answer`` always equals tokenizing the whole text; this is checked once
per cell.
"""

from __future__ import annotations

import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from manyicl.errors import ManyICLError
from manyicl.families import FAMILIES
from manyicl.formatter import Formatter
from manyicl.sequences import leading_special_ids, tokenize_spans
from manyicl.tasks import Example, Task, take_fitting

CONTENT_FREE_INPUTS = ("N/A", "")  # contextual calibration (Zhao et al. 2021)


@dataclass
class EncodedQuery:
    ids: list[int]
    # ranked families: each candidate's answer tokens (answer + delimiter) in context, how many of them are the
    # answer itself (the score; the delimiter is not part of it), and the answer's length in characters
    candidates: list[list[int]]
    answer_tokens: list[int]
    answer_chars: list[int]


def shot_budget(shots: int | str, max_tokens: int) -> tuple[int | str, int]:
    """A requested shot count and the context budget it is evaluated in: ``max@4096`` is as many demonstrations as
    fit in 4,096 tokens (e.g. twice the training length, to see whether in-context learning extends past it);
    ``max`` and plain counts use the evaluation budget."""
    if isinstance(shots, str) and shots.startswith("max@"):
        return "max", int(shots[4:])
    return shots, max_tokens


def check_shots(task: Task, shots: int | str) -> None:
    if isinstance(shots, int) and shots > len(task.train):
        raise ManyICLError(f"task {task.name}: shots={shots} is larger than its train split "
                           f"({len(task.train)} examples); lower it")


class Prompter:
    """The prompts of one task under one context budget."""

    def __init__(self, task: Task, tokenizer: Any, formatter: Formatter, max_tokens: int,
                 max_new_tokens: int | None = None):
        self.task, self.tokenizer, self.formatter, self.max_tokens = task, tokenizer, formatter, max_tokens
        self.family = FAMILIES[task.family]
        self.ranked = self.family.ranked
        self.labels = tuple(task.labels or ())
        self.max_new_tokens = max_new_tokens or self.family.max_new_tokens or 64
        self.answer_form = formatter.answer_form  # decided by the formatter, for training and evaluation alike
        self.lead = leading_special_ids(tokenizer)
        self._costs: dict[int, int] = {}
        self._prefixes: dict[tuple[Example, ...], list[int]] = {}
        self._checked: set[tuple[Example, ...]] = set()
        # contextual calibration's content-free scores, per (prefix digest, candidate texts): measured with the first
        # queries after that prefix and reused by later calls with it (a served task's requests); bounded, since
        # cloze multiple choice has a candidate list per query. They are the scores of the backend that measured
        # them: a Prompter evaluated with another model (or the naive path in a comparison) clears it first
        self.calibration: OrderedDict[tuple, list[float]] = OrderedDict()

    # ---- answers
    def candidates(self, example: Example) -> tuple[list[str], list[str]]:
        """(names, texts): what a prediction is called (label or letter) and the text scored for it."""
        if self.answer_form == "cloze":
            return [chr(ord("A") + i) for i in range(len(example.choices))], list(example.choices)
        return list(self.labels), list(self.labels)

    # ---- demonstrations
    def example_tokens(self, index: int) -> int:
        """Token count of one train example (prompt + answer) on its own; a close estimate of its cost in context."""
        if index not in self._costs:
            ex = self.task.train[index]
            text = self.formatter.prompt(ex.input) + self.formatter.answer(self.formatter.target(ex))
            self._costs[index] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._costs[index]

    def choose_demonstrations(self, shots: int | str, seed: int, balance: bool, queries: list[Example],
                              reserve: int | None = None) -> list[Example]:
        """The first ``shots`` examples of the seeded picking order that fit next to the longest query that fits at
        all (or next to ``reserve`` tokens, when the queries are not known yet: a served task), laid out in one
        random order. ``balance``: label-set tasks get as many examples of each label as fit (the remainder on
        random labels, Task.balanced_picks), so the prompt's label counts say nothing about the query's label;
        otherwise an i.i.d. sample."""
        check_shots(self.task, shots)
        rng = random.Random(f"eval:{self.task.name}:{seed}")
        picks = self.task.balanced_picks(rng) if balance else self.task.order(rng)
        wanted = picks if shots == "max" else picks[:shots]
        if reserve is None:
            reserve = 0
            for q in queries:
                need = self.query_budget(self.encode_query("", q))
                if need + len(self.lead) <= self.max_tokens:
                    reserve = max(reserve, need)
        header = self.tokenizer(self.formatter.header, add_special_tokens=False)["input_ids"]
        budget = self.max_tokens - reserve - len(self.lead) - len(header)
        picked = take_fitting(wanted, self.example_tokens, budget)
        layout = list(picked)
        rng.shuffle(layout)  # where each demonstration stands: one random order, no label rounds
        chosen = [self.task.train[i] for i in layout]
        # token counts of separate examples can differ slightly in context: trim (the last picked first, which
        # keeps the counts balanced) until the prefix really fits
        while chosen and len(self.prefix_ids(chosen)) > self.max_tokens - reserve:
            picked.pop()
            kept = set(picked)
            chosen = [self.task.train[i] for i in layout if i in kept]
        if shots != "max" and len(chosen) < shots:
            warnings.warn(f"{self.task.name}: only {len(chosen)} of {shots} demonstrations fit in "
                          f"{self.max_tokens} tokens", stacklevel=2)
        return chosen

    # ---- token ids
    def _prefix_text(self, demos: list[Example]) -> tuple[Any, str]:
        """The demonstrations as shown, and the text they share (without the continuation that closes a render)."""
        rendered = self.formatter.render(demos)  # ends with the continuation: the last
        # delimiter tokenizes as in training
        return rendered, rendered.text[: len(rendered.text) - len(self.formatter.continuation)]

    def prefix_ids(self, demos: list[Example]) -> list[int]:
        """Lead special tokens + header + demonstrations: what every query of the cell shares."""
        key = tuple(demos)  # a served task asks for the same prefix on every request: tokenized once
        if key not in self._prefixes:
            rendered, prefix_text = self._prefix_text(demos)
            if not prefix_text:
                self._prefixes[key] = list(self.lead)
            else:
                ids, spans = tokenize_spans(self.tokenizer, rendered.text, [(0, len(prefix_text))], self.lead)
                self._prefixes[key] = ids[: spans[0][1]]
        return list(self._prefixes[key])

    def context(self, demos: list[Example]) -> str:
        """The text that decides how a query tokenizes: the last demonstration (or the header)."""
        rendered, prefix_text = self._prefix_text(demos)
        return prefix_text[rendered.example_spans[-1][0] :] if demos else prefix_text

    def encode_query(self, context: str, query: Example) -> EncodedQuery:
        """Token ids of the query prompt and of each candidate answer as they appear after ``context``."""
        prompt = self.formatter.prompt(query.input)
        texts = self.candidates(query)[1] if self.ranked else [""]
        query_ids, candidates, answer_tokens, answer_chars = None, [], [], []
        for text in texts:
            a = self.formatter.answer(text) if self.ranked else ""
            start, end = len(context), len(context) + len(prompt)
            spans = [(start, end)] + ([(end, end + len(a))] if a else [])
            ids, tspans = tokenize_spans(self.tokenizer, context + prompt + a + self.formatter.continuation, spans)
            q = ids[tspans[0][0] : tspans[0][1]]
            if query_ids is not None and q != query_ids:
                raise ManyICLError(f"task {self.task.name}: the query tokenizes differently before different "
                                   "answers; change the template")
            query_ids = q
            if a:
                candidates.append(ids[tspans[1][0] : tspans[1][1]])
                answer_end = end + a.index(text) + len(text)  # the answer's own characters, not the delimiter
                _, [(first, last)] = tokenize_spans(self.tokenizer, context + prompt + a + self.formatter.continuation,
                                                    [(end, answer_end)], strict=False)
                answer_tokens.append(last - first)
                answer_chars.append(len(text))
        return EncodedQuery(query_ids, candidates, answer_tokens, answer_chars)

    def query_budget(self, query: EncodedQuery) -> int:
        """Tokens one query needs after the prefix: its prompt and its longest possible answer."""
        answer = max((len(c) for c in query.candidates), default=0) if self.ranked else self.max_new_tokens
        return len(query.ids) + answer

    def check_in_context(self, demos: list[Example], prefix: list[int], query: Example, encoded: EncodedQuery) -> None:
        """Once per cell (per prefix): the pieces must equal tokenizing the whole prompt at once."""
        if tuple(demos) in self._checked:
            return
        _, prefix_text = self._prefix_text(demos)
        answer = self.formatter.answer(self.candidates(query)[1][0]) if self.ranked else ""
        full = self.tokenizer(prefix_text + self.formatter.prompt(query.input) + answer + self.formatter.continuation,
                              add_special_tokens=False)["input_ids"]
        pieces = prefix[len(self.lead) :] + encoded.ids + (encoded.candidates[0] if answer else [])
        if full[: len(pieces)] != pieces:
            raise ManyICLError(f"task {self.task.name}: prefix and query do not tokenize as the full prompt; "
                               "change the template")
        self._checked.add(tuple(demos))
