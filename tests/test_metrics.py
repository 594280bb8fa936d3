import math

import pytest

from manyicl.metrics import exact_match, last_number, multilabel_f1, numeric_match, rouge, score, token_f1


def test_exact_match_normalisation_and_multiple_golds():
    assert exact_match(["The Eiffel Tower."], [("eiffel tower",)]) == 1.0
    assert exact_match(["Paris"], [("London", "paris")]) == 1.0
    assert token_f1(["the big red dog"], [("big dog",)]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_numeric_match():
    assert numeric_match(["so the answer is 1,234."], [("1234",)]) == 1.0
    assert numeric_match(["3.50"], [("3.5",)]) == 1.0 and numeric_match(["no number"], [("3",)]) == 0.0
    assert last_number("-2 then 7.25") == 7.25


def test_rouge_scores_non_latin_scripts():
    # rouge-score's default tokenizer would score these 0: it keeps only [a-z0-9]
    assert rouge(["北京是中国的首都"], [("中国的首都是北京",)])["rouge1"] == pytest.approx(1.0)
    assert 0 < rouge(["Привет мир"], [("привет всем",)])["rouge_l"] < 1
    assert rouge(["a b c"], [("x", "a b c")])["rouge_l"] == 1.0  # best reference counts


def test_multilabel_f1_and_score_dispatch():
    assert multilabel_f1(["joy, love"], [("joy",)]) == pytest.approx(2 / 3)
    s = score("accuracy", ["a", "b"], [("a",), ("a",)])
    assert s["value"] == 0.5 and "macro_f1" in s
    assert math.isclose(score("rouge_l", ["x y"], [("x y",)])["value"], 1.0)
