"""One row per task family: everything the pipeline needs to know about it, in one place.

Adding a family means adding a row here (and, for a new metric, a row in metrics.METRICS).
"""

from __future__ import annotations

from dataclasses import dataclass

MULTILABEL_SEPARATOR = ", "
# How ranked families' candidates can be scored (evaluation/cells.py computes all four per query)
SCORINGS = ("sum", "mean", "per_char", "calibrated")


@dataclass(frozen=True)
class Family:
    name: str
    answer_word: str  # the word before the answer in the one format ("Label: positive")
    label_set: bool  # answers come from a fixed set of labels (label-balanced demonstrations)
    ranked: bool  # evaluation ranks the label candidates by likelihood instead of generating
    metric: str  # the default primary metric
    max_new_tokens: int = 0  # generation budget (generated families)
    label_hint: bool = False  # name the labels before each answer ("Label (negative or positive):"), see formatter.py
    several_labels: bool = False  # an answer lists one or more labels, MULTILABEL_SEPARATOR between them

    def labels_of(self, answer: str) -> list[str]:
        """The labels an answer names: itself, or each of its list."""
        return answer.split(MULTILABEL_SEPARATOR) if self.several_labels else [answer]

    def postprocess(self, generated: str, labels: tuple[str, ...]) -> str:
        """A generated answer as a prediction: a list of labels keeps the known ones, in label order."""
        if self.several_labels:
            parts = {p.strip() for p in generated.split(MULTILABEL_SEPARATOR.strip())}
            return MULTILABEL_SEPARATOR.join(label for label in labels if label in parts)
        return generated


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("classification", "Label", label_set=True, ranked=True, metric="accuracy", label_hint=True),
    Family("multilabel", "Labels", label_set=True, ranked=False, metric="multilabel_f1", max_new_tokens=32,
           several_labels=True),
    Family("nli", "Answer", label_set=True, ranked=True, metric="accuracy", label_hint=True),
    Family("multiple_choice", "Answer", label_set=True, ranked=True, metric="accuracy"),
    Family("qa", "Answer", label_set=False, ranked=False, metric="exact_match", max_new_tokens=32),
    Family("summarization", "Summary", label_set=False, ranked=False, metric="rouge_l", max_new_tokens=96),
    Family("math", "Answer", label_set=False, ranked=False, metric="numeric_match", max_new_tokens=16),
    Family("generation", "Output", label_set=False, ranked=False, metric="exact_match", max_new_tokens=64),
]}
