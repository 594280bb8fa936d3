"""Per-family metrics. Library implementations where they exist (scikit-learn, rouge-score); the QA answer
normalisation is the SQuAD one (lower-case, drop punctuation and articles, collapse whitespace)."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

from rouge_score import rouge_scorer, tokenizers
from sklearn.metrics import f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from manyicl.tasks import MULTILABEL_SEPARATOR


def accuracy(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    return sum(p in g for p, g in zip(predictions, golds)) / max(len(predictions), 1)


def macro_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    return float(f1_score([g[0] for g in golds], list(predictions), average="macro", zero_division=0))


def split_labels(text: str) -> list[str]:
    return sorted({part.strip() for part in text.split(MULTILABEL_SEPARATOR.strip()) if part.strip()})


def multilabel_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]], average: str = "micro") -> float:
    """F1 over label sets (``"a, b"`` strings); ``average`` is micro (the reported value) or macro."""
    pred_sets = [split_labels(p) for p in predictions]
    gold_sets = [split_labels(g[0]) for g in golds]
    binarizer = MultiLabelBinarizer().fit(pred_sets + gold_sets)
    return float(f1_score(binarizer.transform(gold_sets), binarizer.transform(pred_sets), average=average, zero_division=0))


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    return sum(any(normalize_answer(p) == normalize_answer(g) for g in gs) for p, gs in zip(predictions, golds)) / max(len(predictions), 1)


def token_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return sum(max(f1(p, g) for g in gs) for p, gs in zip(predictions, golds)) / max(len(predictions), 1)


class MultilingualTokenizer(tokenizers.Tokenizer):
    """rouge-score's default tokenizer keeps only [a-z0-9] and so scores Chinese, Arabic, Thai... as empty.
    Here: lower-case, NFKC, words of any script; scripts written without spaces (CJK, Thai) count per character."""

    _no_spaces = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text.lower())
        tokens = []
        for word in re.findall(r"\w+", text):
            tokens += list(word) if self._no_spaces.search(word) else [word]
        return tokens


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=MultilingualTokenizer())


def rouge(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures; with several references the best one counts."""
    totals = Counter()
    for p, gs in zip(predictions, golds):
        best = max((_ROUGE.score(g, p) for g in gs), key=lambda s: s["rougeL"].fmeasure)
        totals.update({k: v.fmeasure for k, v in best.items()})
    n = max(len(predictions), 1)
    return {"rouge1": totals["rouge1"] / n, "rouge2": totals["rouge2"] / n, "rouge_l": totals["rougeL"] / n}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """The final number of the prediction equals the gold number (relative tolerance 1e-6)."""
    def match(p: str, gs: Sequence[str]) -> bool:
        value = last_number(p)
        return value is not None and any(
            (g_value := last_number(g)) is not None and abs(value - g_value) <= 1e-6 * max(1.0, abs(g_value)) for g in gs
        )

    return sum(match(p, gs) for p, gs in zip(predictions, golds)) / max(len(predictions), 1)


def score(metric: str, predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """The primary metric under ``value`` plus the family's companion metrics."""
    if metric == "accuracy":
        return {"value": accuracy(predictions, golds), "macro_f1": macro_f1(predictions, golds)}
    if metric == "macro_f1":
        return {"value": macro_f1(predictions, golds), "accuracy": accuracy(predictions, golds)}
    if metric == "multilabel_f1":
        return {"value": multilabel_f1(predictions, golds, "micro"), "macro_f1": multilabel_f1(predictions, golds, "macro")}
    if metric == "exact_match":
        return {"value": exact_match(predictions, golds), "token_f1": token_f1(predictions, golds)}
    if metric == "rouge_l":
        r = rouge(predictions, golds)
        return {"value": r["rouge_l"], "rouge1": r["rouge1"], "rouge2": r["rouge2"]}
    if metric == "numeric_match":
        return {"value": numeric_match(predictions, golds)}
    raise ValueError(f"unknown metric {metric!r}")
