"""Metrics: one registry row per metric. Library implementations where they exist (scikit-learn, rouge-score);
the QA answer normalisation is the SQuAD one (lower-case, drop punctuation and articles, collapse whitespace).

Every metric is also written as per-query additive statistics (``rows``) and a function of their mean
(``from_means``): accuracy is the mean of 0/1, macro-F1 a function of per-label true/false positive and false
negative counts. A bootstrap then resamples queries by resampling rows (uncertainty.py), for every metric alike;
``score`` cross-checks the two ways for the primary value's companions.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from rouge_score import rouge_scorer, tokenizers
from sklearn.metrics import f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from manyicl.families import MULTILABEL_SEPARATOR

Golds = Sequence[Sequence[str]]


def split_labels(text: str) -> list[str]:
    return sorted({part.strip() for part in text.split(MULTILABEL_SEPARATOR.strip()) if part.strip()})


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


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


@lru_cache(maxsize=2)
def _rouge(english: bool) -> rouge_scorer.RougeScorer:
    """English: the usual rouge-score setup (its tokenizer, Porter stemmer), comparable with published numbers;
    other languages: the multilingual tokenizer, no stemmer (the default tokenizer would score them as empty)."""
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    if english:
        return rouge_scorer.RougeScorer(keys, use_stemmer=True)
    return rouge_scorer.RougeScorer(keys, tokenizer=MultilingualTokenizer())


def rouge_setup(language: str) -> str:
    return ("ROUGE-Lsum, rouge-score tokenizer, Porter stemmer" if language == "en"
            else "ROUGE-Lsum, multilingual tokenizer (words of any script, CJK/Thai per character), no stemmer")


def rouge_scores(prediction: str, golds: Sequence[str], language: str) -> dict[str, float]:
    """F-measures against the best reference (by ROUGE-Lsum)."""
    scorer = _rouge(language == "en")
    best = max((scorer.score(g, prediction) for g in golds), key=lambda s: s["rougeLsum"].fmeasure)
    return {k: v.fmeasure for k, v in best.items()}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(prediction: str, golds: Sequence[str]) -> bool:
    """The final number of the prediction equals a gold number (relative tolerance 1e-6)."""
    value = last_number(prediction)
    return value is not None and any(
        (g := last_number(gold)) is not None and abs(value - g) <= 1e-6 * max(1.0, abs(g)) for gold in golds
    )


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator, dtype=float), where=denominator > 0)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Metric:
    name: str
    # per query -> a row of additive statistics: (predictions, golds, labels, language) -> array (n, m)
    rows: Callable[[Sequence[str], Golds, Sequence[str], str], np.ndarray]
    # mean rows (..., m) -> metric value (...)
    from_means: Callable[[np.ndarray], np.ndarray]
    # companion metrics shown beside the primary one: (predictions, golds, labels, language) -> {name: value}
    companions: Callable[[Sequence[str], Golds, Sequence[str], str], dict[str, float]]


def _column(values) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(-1, 1)


def _first(means: np.ndarray) -> np.ndarray:
    return means[..., 0]


def _label_counts(predictions, golds, labels, language) -> np.ndarray:
    """Per query and label: [true positive, false positive, false negative], for macro-F1 over ``labels`` (the
    task's declared label set; the gold labels when there is none)."""
    labels = list(labels) or sorted({g[0] for g in golds})
    p = np.array([[pred == label for label in labels] for pred in predictions],
                 dtype=float).reshape(len(predictions), -1)
    g = np.array([[gold[0] == label for label in labels] for gold in golds], dtype=float).reshape(len(golds), -1)
    return np.concatenate([p * g, p * (1 - g), (1 - p) * g], axis=1)


def _macro_f1(means: np.ndarray) -> np.ndarray:
    tp, fp, fn = np.split(means, 3, axis=-1)
    return _f1_from_counts(tp, fp, fn).mean(-1)


def _set_counts(predictions, golds, labels, language) -> np.ndarray:
    """Per query: [true positive, false positive, false negative] labels, for micro-F1 over label sets."""
    rows = []
    for pred, gold in zip(predictions, golds):
        p, g = set(split_labels(pred)), set(split_labels(gold[0]))
        rows.append([len(p & g), len(p - g), len(g - p)])
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def _micro_f1(means: np.ndarray) -> np.ndarray:
    return _f1_from_counts(means[..., 0], means[..., 1], means[..., 2])


def sklearn_macro_f1(predictions, golds, labels) -> float:
    return float(f1_score([g[0] for g in golds], list(predictions), labels=list(labels) or None, average="macro",
                          zero_division=0))


def multilabel_macro_f1(predictions, golds) -> float:
    pred_sets, gold_sets = [split_labels(p) for p in predictions], [split_labels(g[0]) for g in golds]
    binarizer = MultiLabelBinarizer().fit(pred_sets + gold_sets)
    return float(f1_score(binarizer.transform(gold_sets), binarizer.transform(pred_sets), average="macro",
                          zero_division=0))


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("accuracy", lambda p, g, labels, lang: _column([x in y for x, y in zip(p, g)]), _first,
           lambda p, g, labels, lang: {"macro_f1": sklearn_macro_f1(p, g, labels)}),
    Metric("macro_f1", _label_counts, _macro_f1,
           lambda p, g, labels, lang: {"accuracy": float(np.mean([x in y for x, y in zip(p, g)])) if p else 0.0}),
    Metric("multilabel_f1", _set_counts, _micro_f1,
           lambda p, g, labels, lang: {"macro_f1": multilabel_macro_f1(p, g)}),
    Metric("exact_match",
           lambda p, g, labels, lang: _column([any(normalize_answer(x) == normalize_answer(y) for y in ys)
                                               for x, ys in zip(p, g)]),
           _first,
           lambda p, g, labels, lang: {"token_f1": float(np.mean([max(token_f1(x, y) for y in ys)
                                                                  for x, ys in zip(p, g)])) if p else 0.0}),
    Metric("rouge_l",
           lambda p, g, labels, lang: _column([rouge_scores(x, ys, lang)["rougeLsum"] for x, ys in zip(p, g)]),
           _first,
           lambda p, g, labels, lang: {k: float(np.mean([rouge_scores(x, ys, lang)[k] for x, ys in zip(p, g)]))
                                       if p else 0.0 for k in ("rouge1", "rouge2", "rougeL")}),
    Metric("numeric_match", lambda p, g, labels, lang: _column([numeric_match(x, ys) for x, ys in zip(p, g)]), _first,
           lambda p, g, labels, lang: {}),
]}


def metric_rows(metric: str, predictions: Sequence[str], golds: Golds, labels: Sequence[str] = (),
                language: str = "en") -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    return METRICS[metric].rows(predictions, golds, labels, language)


def score(metric: str, predictions: Sequence[str], golds: Golds, labels: Sequence[str] = (),
          language: str = "en") -> dict[str, float]:
    """The primary metric under ``value`` plus the metric's companions."""
    if not predictions:
        return {"value": float("nan")}
    m = METRICS[metric]
    value = float(m.from_means(m.rows(predictions, golds, labels, language).mean(0)))
    return {"value": value, **m.companions(predictions, golds, labels, language)}
