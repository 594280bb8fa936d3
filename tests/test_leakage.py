"""Leakage checks: nothing in the data a comparison is built on gives an answer away.

- Training sequences: no answer can be guessed from the order or counts of the answers before it. Two order-only
  predictors ("the least-seen label so far", "a label missing from the current round of |labels| answers") must do
  no better than always answering the majority label. The label-round order this project used before fails the
  same test (the negative control): it let every fine-tune learn the round structure instead of the task.
- Evaluation prompts: label-balanced counts, in one random order (not in rounds).
- Multiple choice: one answer form, so a fine-tune is scored on the strings it was trained on.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from scipy import stats

from manyicl.evaluation.prompting import Prompter
from manyicl.formatter import Formatter
from manyicl.sequences import SequenceBuilder
from manyicl.task_files import load_task_dir
from manyicl.tasks import Task

SEEDS = range(8)
TASKS = ["sst2", "trec", "snli"]


class RoundOrderBuilder(SequenceBuilder):
    """Training sequences in the order training used before (the broken version): rounds of one example per label,
    each round shuffled, which is exactly the order in which balanced evaluation prompts now only PICK examples."""

    def order(self, rng: random.Random) -> list[int]:
        return self.task.balanced_picks(rng)


def supervised_labels(builder: SequenceBuilder, tokenizer, seed: int) -> list[str]:
    """The answers a many_shot_all training sequence supervises, read back from its tokens."""
    seq = builder.build(seed)
    labels = [tokenizer.decode(seq.input_ids[s:e]).strip() for s, e in seq.target_spans]
    assert set(labels) <= set(builder.task.labels)
    return labels


def least_seen(history: list[str], labels: list[str]) -> str:
    counts = Counter(history)
    return min(labels, key=lambda label: counts[label])  # ties: the first in ``labels`` (most frequent first)


def missing_from_round(history: list[str], labels: list[str]) -> str:
    start = len(history) - len(history) % len(labels)
    seen = set(history[start:])
    return next(label for label in labels if label not in seen)


PREDICTORS = {"least_seen": least_seen, "missing_from_round": missing_from_round}


def predictor_rates(sequences: list[list[str]], labels: list[str]) -> tuple[dict[str, float], float, int]:
    """Each predictor's accuracy on every supervised position, the majority-label rate there, and the count."""
    n = sum(len(s) for s in sequences)
    right = Counter()
    for seq in sequences:
        for i, gold in enumerate(seq):
            for name, predict in PREDICTORS.items():
                right[name] += predict(seq[:i], labels) == gold
    majority = max(Counter(label for s in sequences for label in s).values()) / n
    return {name: right[name] / n for name in PREDICTORS}, majority, n


def beats_majority(rate: float, majority: float, n: int) -> bool:
    """Above the binomial 95 % band of the majority-label rate on these positions. One-sided: a predictor below
    the majority rate is not a shortcut (in i.i.d. order "least seen" mostly names the minority label)."""
    return rate > stats.binom.ppf(0.975, n, majority) / n


def _sequences(builder_type, task, tokenizer) -> list[list[str]]:
    builder = builder_type(task, tokenizer, Formatter.for_task(task, tokenizer), 2048, "many_shot_all")
    return [supervised_labels(builder, tokenizer, seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def real_tasks(data_dir):
    return {name: load_task_dir(data_dir / name) for name in TASKS}


def _labels_by_frequency(task: Task) -> list[str]:
    counts = Counter(ex.output for ex in task.train)
    return sorted(task.labels, key=lambda label: -counts[label])


@pytest.mark.parametrize("name", TASKS)
def test_no_answer_is_predictable_from_the_answers_before_it(real_tasks, smol_tokenizer, name):
    task = real_tasks[name]
    rates, majority, n = predictor_rates(_sequences(SequenceBuilder, task, smol_tokenizer), _labels_by_frequency(task))
    assert n >= 300
    for predictor, rate in rates.items():
        assert not beats_majority(rate, majority, n), (predictor, rate, majority, n)


@pytest.mark.parametrize("name", TASKS)
def test_negative_control_the_round_order_gives_answers_away(real_tasks, smol_tokenizer, name):
    """The same check on the label-round order must fail, or it could not catch the shortcut."""
    task = real_tasks[name]
    rates, majority, n = predictor_rates(_sequences(RoundOrderBuilder, task, smol_tokenizer),
                                         _labels_by_frequency(task))
    assert any(beats_majority(rate, majority, n) for rate in rates.values()), (rates, majority, n)


@pytest.mark.parametrize("name", TASKS)
def test_evaluation_prompts_have_balanced_counts_in_one_random_order(real_tasks, smol_tokenizer, name):
    task = real_tasks[name]
    prompter = Prompter(task, smol_tokenizer, Formatter.for_task(task, smol_tokenizer), 2048)
    queries = task.test[:20]
    complete_first_rounds = 0
    for seed in SEEDS:
        demos = prompter.choose_demonstrations("max", seed, True, queries)
        counts = Counter(d.output for d in demos)
        assert set(counts) == set(task.labels) and max(counts.values()) - min(counts.values()) <= 1, counts
        first = [d.output for d in demos[: len(task.labels)]]
        complete_first_rounds += set(first) == set(task.labels)
    assert complete_first_rounds < len(SEEDS)  # the layout is not the picking order's rounds


def test_multiple_choice_trains_on_the_strings_evaluation_scores(data_dir, smol_tokenizer):
    """Cloze (the default): the supervised spans of a training sequence decode to exactly the gold candidates
    that evaluation scores for the same examples; with format.multiple_choice=letter, both are the letters."""
    task = load_task_dir(data_dir / "openbookqa")
    for form in ("cloze", "letter"):
        formatter = Formatter.for_task(task, smol_tokenizer, multiple_choice=form)
        builder = SequenceBuilder(task, smol_tokenizer, formatter, 1024, "many_shot_all")
        seq = builder.build(0)
        used = [task.train[i] for i in builder.order(random.Random(f"{task.name}:0"))[: seq.n_examples]]
        prompter = Prompter(task, smol_tokenizer, formatter, 1024)
        assert prompter.answer_form == form
        for (s, e), example in zip(seq.target_spans, used):
            names, texts = prompter.candidates(example)
            gold = texts[names.index(example.output)]
            encoded = prompter.encode_query("", example)
            scored = encoded.candidates[names.index(example.output)]
            assert seq.input_ids[s:e] == scored, (form, example.source)
            assert smol_tokenizer.decode(seq.input_ids[s:e]) == formatter.answer(gold)
            assert (gold == example.output) == (form == "letter")
