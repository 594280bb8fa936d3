import math

import numpy as np
import pytest

from manyicl.metrics import (
    METRICS,
    last_number,
    metric_rows,
    numeric_match,
    rouge_scores,
    score,
    sklearn_macro_f1,
    token_f1,
)


def test_exact_match_normalisation_and_multiple_golds():
    assert score("exact_match", ["The Eiffel Tower."], [("eiffel tower",)])["value"] == 1.0
    assert score("exact_match", ["Paris"], [("London", "paris")])["value"] == 1.0
    assert token_f1("the big red dog", "big dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_numeric_match():
    assert numeric_match("so the answer is 1,234.", ("1234",))
    assert numeric_match("3.50", ("3.5",)) and not numeric_match("no number", ("3",))
    assert last_number("-2 then 7.25") == 7.25


def test_rouge_lsum_stemmed_for_english_multilingual_otherwise():
    # English: rouge-score's usual setup, Porter stemmer ("cats running" = "cat runs")
    assert rouge_scores("the cats running", ("the cat runs",), "en")["rougeLsum"] == pytest.approx(1.0)
    # rouge-score's default tokenizer would score these 0: it keeps only [a-z0-9]
    assert rouge_scores("北京是中国的首都", ("中国的首都是北京",), "zh")["rouge1"] == pytest.approx(1.0)
    assert 0 < rouge_scores("Привет мир", ("привет всем",), "ru")["rougeLsum"] < 1
    assert score("rouge_l", ["a b c"], [("x", "a b c")])["value"] == 1.0  # best reference counts


@pytest.mark.parametrize("metric, predictions, golds, labels", [
    ("accuracy", ["a", "b", "a", "c"], [("a",), ("a",), ("a",), ("c",)], ("a", "b", "c")),
    ("macro_f1", ["a", "b", "a", "c", ""], [("a",), ("a",), ("b",), ("c",), ("b",)], ("a", "b", "c", "d")),
    ("multilabel_f1", ["joy, love", "", "anger"], [("joy",), ("fear",), ("anger, joy",)], ()),
    ("exact_match", ["Paris", "x"], [("paris",), ("y",)], ()),
])
def test_value_from_per_query_rows_equals_the_library(metric, predictions, golds, labels):
    """The bootstrap resamples per-query rows; their function must give the library's number."""
    rows = metric_rows(metric, predictions, golds, labels)
    from_rows = float(METRICS[metric].from_means(rows.mean(0)))
    library = {
        "accuracy": lambda: np.mean([p in g for p, g in zip(predictions, golds)]),
        "macro_f1": lambda: sklearn_macro_f1(predictions, golds, labels),  # over the DECLARED labels, "d" included
        "multilabel_f1": lambda: 2 * 2 / (2 * 2 + 1 + 2),  # tp=2 (joy, anger), fp=1 (love), fn=2 (fear, joy)
        "exact_match": lambda: 0.5,
    }[metric]()
    assert (from_rows == pytest.approx(library)
            and score(metric, predictions, golds, labels)["value"] == pytest.approx(library))


def test_score_companions():
    s = score("accuracy", ["a", "b"], [("a",), ("a",)], ("a", "b"))
    assert s["value"] == 0.5 and "macro_f1" in s
    assert math.isclose(score("rouge_l", ["x y"], [("x y",)])["value"], 1.0)
    assert math.isnan(score("accuracy", [], [])["value"])
