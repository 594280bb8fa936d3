"""The sequence builder: a task's examples -> token ids + labels for one training or evaluation sequence.

Objectives (the paper's four fine-tuning strategies):

- ``zero_shot``       one example (query + answer); packed sequences keep every example isolated.
- ``few_shot``        ``n_shots`` demonstrations + one query, loss on the last answer only.
- ``many_shot_last``  demonstrations fill the token budget, loss on the last answer only (the baseline).
- ``many_shot_all``   demonstrations fill the token budget, loss on EVERY answer (ManyICL): answer i is
                      learned from the i-1 before it, so one pass trains every shot count at once.

Token ids always equal tokenizing the full formatted text; labels are -100 except on answer tokens
(answer + end-of-answer delimiter), aligned with ``input_ids`` as in transformers (the model shifts them).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any
from typing import Sequence as Seq

from manyicl.errors import ManyICLError
from manyicl.formatter import Formatter
from manyicl.tasks import Example, Task, take_fitting

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Objective:
    """One fine-tuning strategy: which examples a sequence holds and which answers are supervised."""

    name: str
    examples: str  # "one": a single example; "few": n_shots demonstrations + a query; "fill": up to the budget
    supervise_all: bool  # every answer (ManyICL) or only the last one
    isolated: bool  # a sequence is one short unit: several are packed per row (positions restart) when training.pack


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("zero_shot", "one", supervise_all=False, isolated=True),
    Objective("few_shot", "few", supervise_all=False, isolated=True),
    Objective("many_shot_last", "fill", supervise_all=False, isolated=False),
    Objective("many_shot_all", "fill", supervise_all=True, isolated=False),
]}


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    target_spans: list[tuple[int, int]]  # [start, end) token indices of each supervised answer
    n_examples: int  # complete (input, answer) examples in the sequence
    n_demonstrations: int  # examples that serve as context for a later answer (all of them for many_shot_all)
    n_truncated: int = 0  # examples whose input was shortened to fit the budget
    position_ids: list[int] | None = None  # set when isolated examples are packed (positions restart)
    task: str = ""
    text: str = ""

    @property
    def n_targets(self) -> int:
        return len(self.target_spans)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def target_index(self) -> list[int]:
        """Per token: which target (0, 1, ...) it belongs to, -1 if none; used for per-target loss weights."""
        index = [-1] * len(self.input_ids)
        for k, (s, e) in enumerate(self.target_spans):
            index[s:e] = [k] * (e - s)
        return index

    def to_json(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "target_spans": [list(s) for s in self.target_spans],
            "n_demonstrations": self.n_demonstrations,
            "n_targets": self.n_targets,
            "n_tokens": self.n_tokens,
            "n_examples": self.n_examples,
            "n_truncated": self.n_truncated,
        }


# ---------------------------------------------------------------- tokenization with target alignment


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama/Gemma/Mistral, none for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def tokenize_spans(
    tokenizer: Any, text: str, char_spans: Seq[tuple[int, int]], lead: Seq[int] = (), strict: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``text`` once (after the ``lead`` special tokens) and map character spans to token spans.

    Raises if a token straddles a span boundary (``strict``): then the target could not be supervised without
    also supervising prompt text, and the template must change. Not strict: such a token belongs to the span.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    token_spans = []
    for s, e in char_spans:
        first = bisect.bisect_right(ends, s)  # first token ending after s
        last = bisect.bisect_left(starts, e)  # one past the last token starting before e
        if first >= last:
            raise ManyICLError(f"answer at characters {s}-{e} has no tokens; check the template")
        if strict and (starts[first] < s or ends[last - 1] > e):
            raise ManyICLError(
                f"tokenizer merges across an answer boundary at characters {s}-{e} "
                f"({text[max(0, s - 10):s]!r}|{text[s:s + 10]!r}); "
                "change template.output_prefix/answer_prefix/delimiter"
            )
        token_spans.append((first + len(lead), last + len(lead)))
    return list(lead) + ids, token_spans


def _labels_for(ids: list[int], spans: Seq[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    return labels


# ---------------------------------------------------------------- the builder


@dataclass
class SequenceBuilder:
    """Builds sequences of one task. Reusable: per-example token counts are cached across calls."""

    task: Task
    tokenizer: Any
    formatter: Formatter
    max_tokens: int
    objective: str = "many_shot_all"
    n_shots: int = 5
    _lengths: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ManyICLError(f"objective: unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        self.spec = OBJECTIVES[self.objective]
        if not self.task.train:
            raise ManyICLError(f"task {self.task.name}: no training examples to build sequences from")
        self._lead = leading_special_ids(self.tokenizer)
        self._overhead = len(self._lead) + self._count(self.formatter.header + self.formatter.continuation)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_budget(self) -> None:
        """Fail before any training if some answer cannot fit the budget even with an empty input."""
        answers = [self.formatter.answer(self.formatter.target(ex)) for ex in self.task.train]
        lengths = [len(ids) for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        worst = max(range(len(lengths)), key=lengths.__getitem__)
        self.shorten(self.task.train[worst])  # raises with the example's file:line if it cannot fit

    def example_tokens(self, index: int) -> int:
        """Token count of one example (prompt + answer) on its own; a close estimate of its cost in context."""
        if index not in self._lengths:
            self._lengths[index] = self._example_cost(self.task.train[index])
        return self._lengths[index]

    # ---- sampling order: i.i.d., so no answer can be told from the answers before it (tests/test_leakage.py)
    def order(self, rng: random.Random) -> list[int]:
        return self.task.order(rng)

    # ---- building
    def build(self, seed: int) -> Sequence:
        rng = random.Random(f"{self.task.name}:{seed}")
        order = self.order(rng)
        wanted = {"one": 1, "few": self.n_shots + 1, "fill": len(order)}[self.spec.examples]
        return self.fit(order[:wanted])

    def take_fitting(self, indices: list[int], budget: int) -> list[Example]:
        """The leading examples of ``indices`` whose summed token counts stay within ``budget``."""
        return [self.task.train[i] for i in take_fitting(indices, self.example_tokens, budget)]

    def fit(self, indices: list[int]) -> Sequence:
        """As many of these train examples as fit the budget, whole; one that alone overflows has its input cut."""
        kept = self.take_fitting(indices, self.max_tokens - self._overhead)
        n_truncated = 0
        first = self.task.train[indices[0]]
        if not kept:  # the first example alone does not fit: shorten its input, never its answer
            kept, n_truncated = [self.shorten(first)], 1
        slack = 0
        while True:
            seq = self._tokenize(kept, n_truncated)
            if seq.n_tokens <= self.max_tokens:
                return seq
            if len(kept) == 1:  # estimate was off for a single example: cut its input more
                # from the original input, by a slack that grows every time: a cut text can encode longer than its
                # tokens (a byte-fallback character split in two), and cutting the cut text again by the same
                # amount could then repeat forever
                if not kept[0].input:  # nothing left to cut: the answer alone overflows
                    raise ManyICLError(f"max_tokens={self.max_tokens} is smaller than one example's answer "
                                       f"({first.source or self.task.name}); raise max_tokens")
                slack += seq.n_tokens - self.max_tokens
                kept, n_truncated = [self.shorten(first, slack=slack)], 1
            else:  # boundary merges made the whole text longer than the sum of its parts
                kept = kept[:-1]

    def _example_cost(self, ex: Example) -> int:
        return self._count(self.formatter.prompt(ex.input) + self.formatter.answer(self.formatter.target(ex)))

    def shorten(self, ex: Example, slack: int = 0) -> Example:
        fixed = self._overhead + self._example_cost(Example("", ex.output, choices=ex.choices))
        if self.max_tokens - fixed < 0 or (self.max_tokens == fixed and ex.input):
            where = f" ({ex.source})" if ex.source else ""
            raise ManyICLError(
                f"max_tokens={self.max_tokens} is smaller than one example's answer{where}: it needs {fixed} tokens "
                f"without its input; raise max_tokens"
            )
        room = max(self.max_tokens - fixed - slack, 0)  # at worst the input goes, and the answer alone fits
        ids = self.tokenizer(ex.input, add_special_tokens=False)["input_ids"][:room]
        return Example(self.tokenizer.decode(ids).strip(), ex.output, ex.answers, ex.source, ex.choices)

    def _tokenize(self, examples: list[Example], n_truncated: int) -> Sequence:
        rendered = self.formatter.render(examples)
        ids, spans = tokenize_spans(self.tokenizer, rendered.text, rendered.target_spans, self._lead)
        if not self.spec.supervise_all:
            spans = spans[-1:]  # loss on the last answer only
        n_demos = len(examples) if self.spec.supervise_all else len(examples) - 1
        return Sequence(ids, _labels_for(ids, spans), spans, len(examples), n_demos, n_truncated, None, self.task.name,
                        rendered.text)

    def build_packed(self, seed: int) -> Sequence:
        """Isolated units (one example for zero_shot, demonstrations + query for few_shot) packed up to the budget.

        Positions restart at every unit. The trainer isolates the units by construction (packing.py: attention
        run per unit, or an explicit block-diagonal mask handed to the model; a model that allows neither is
        refused), never by relying on transformers to infer it: otherwise packed zero-shot examples would silently
        become an ICL sequence. Lets every objective train on the same tokens per step.
        """
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int]] = []
        n = n_demos = n_trunc = 0
        for k in range(self.max_tokens):  # every unit holds at least one token: the loop always ends
            unit = self.build(seed * 7919 + k)
            if ids and len(ids) + unit.n_tokens > self.max_tokens:
                break
            spans += [(s + len(ids), e + len(ids)) for s, e in unit.target_spans]
            ids += unit.input_ids
            labels += unit.labels
            positions += list(range(unit.n_tokens))
            n, n_demos, n_trunc = n + unit.n_examples, n_demos + unit.n_demonstrations, n_trunc + unit.n_truncated
        return Sequence(ids, labels, spans, n, n_demos, n_trunc, positions, self.task.name)
