"""Tasks: named sets of (input, output) examples with a family, a metric and, for label-set families, labels.

The types and the label helpers that training, evaluation and serving share. Reading tasks from files and from
Hugging Face ``datasets`` is in task_files.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from manyicl.errors import ManyICLError
from manyicl.families import FAMILIES
from manyicl.metrics import METRICS


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    answers: tuple[str, ...] = ()  # all gold answers when there are several (QA, multi-reference summaries)
    source: str = ""  # "file:line", for error messages
    choices: tuple[str, ...] = ()  # multiple choice: the option texts in letter order (output is the letter)

    @property
    def golds(self) -> tuple[str, ...]:
        return self.answers or (self.output,)


@dataclass
class Task:
    name: str
    family: str
    train: list[Example]
    test: list[Example]
    metric: str = ""
    labels: tuple[str, ...] | None = None
    template: dict[str, Any] = field(default_factory=dict)  # overrides of formatter.Template fields
    language: str = "en"
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.family not in FAMILIES:
            raise ManyICLError(f"{where}: family: unknown family {self.family!r}; use one of {', '.join(FAMILIES)}")
        self.metric = self.metric or FAMILIES[self.family].metric
        if self.metric not in METRICS:
            raise ManyICLError(f"{where}: metric: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if not self.train and not self.test:
            raise ManyICLError(f"{where}: the task has no examples; add lines to train.jsonl / test.jsonl")
        if FAMILIES[self.family].label_set:
            if self.labels is None:
                self.labels = derive_labels(self.train or self.test, self.family)
            else:
                # queries without an answer (predict's inputs) have nothing to check
                check_labels([ex for ex in (*self.train, *self.test) if ex.output], tuple(self.labels), self.family,
                             where)
            self.labels = tuple(self.labels)

    def label_of(self, example: Example) -> str:
        """The class an example belongs to for label-balanced sampling (its whole output)."""
        return example.output

    def order(self, rng: random.Random) -> list[int]:
        """Indices of train examples in i.i.d. order: the order of training sequences. No rounds or other structure,
        so an answer can never be guessed from the answers before it (tests/test_leakage.py)."""
        indices = list(range(len(self.train)))
        rng.shuffle(indices)
        return indices

    def balanced_picks(self, rng: random.Random) -> list[int]:
        """Indices in the order examples are PICKED for label-balanced evaluation prompts: one example per label in
        turn (each turn's labels in random order), so any leading run holds every label equally often, to one, with
        the remainder on random labels. The picked examples are then laid out in a fresh random order
        (Prompter.choose_demonstrations): this order only decides which examples are used, never where they stand."""
        indices = self.order(rng)
        if not FAMILIES[self.family].label_set:
            return indices
        by_label: dict[str, list[int]] = {}
        for i in indices:
            by_label.setdefault(self.label_of(self.train[i]), []).append(i)
        out = []
        for k in range(max(len(g) for g in by_label.values())):
            turn = [g[k] for g in by_label.values() if k < len(g)]
            rng.shuffle(turn)
            out += turn
        return out


def choice_text(example: Example, letter: str) -> str:
    """The option text that a multiple-choice answer letter names."""
    index = ord(letter) - ord("A")
    if len(letter) != 1 or not 0 <= index < len(example.choices):
        raise ManyICLError(f"{example.source}: answer {letter!r} is not a letter of its {len(example.choices)} choices")
    return example.choices[index]


def answer_form(task: Task, multiple_choice: str = "cloze") -> str:
    """How a task's answers are written, in training and evaluation alike: "cloze" (a multiple-choice answer is the
    chosen option's text, as lm-evaluation-harness scores ARC and OpenBookQA) when every example carries its
    ``choices`` and ``format.multiple_choice`` asks for it; "letter" for other multiple-choice tasks; "label" for
    the other ranked families; "generated" for the rest."""
    if task.family != "multiple_choice":
        return "label" if FAMILIES[task.family].ranked else "generated"
    with_choices = all(ex.choices for ex in task.train + task.test)
    return "cloze" if multiple_choice == "cloze" and with_choices else "letter"


def take_fitting(indices: Iterable[int], cost: Callable[[int], int], budget: int) -> list[int]:
    """The leading ``indices`` whose summed costs stay within ``budget`` (whole examples, in order)."""
    kept, used = [], 0
    for i in indices:
        c = cost(i)
        if used + c > budget:
            break
        kept.append(i)
        used += c
    return kept


def answer_labels(example: Example, family: str) -> list[str]:
    """The labels an answer names: one, or each of a multilabel list."""
    return FAMILIES[family].labels_of(example.output)


def check_labels(examples: Iterable[Example], labels: tuple[str, ...], family: str, where: str) -> None:
    """Every answer of a task with declared labels is one of them (each label of a multilabel answer), or one line
    naming the record: an answer outside the set could never be predicted, and would be silently scored wrong."""
    known = set(labels)
    for ex in examples:
        for label in answer_labels(ex, family):
            if label not in known:
                raise ManyICLError(f"{ex.source or where}: answer {label!r} is not one of the labels declared in "
                                   f"{where} ({', '.join(labels)}); add it to labels or correct the record")


def derive_labels(examples: Iterable[Example], family: str) -> tuple[str, ...]:
    return tuple(sorted({label for ex in examples for label in FAMILIES[family].labels_of(ex.output)}))
