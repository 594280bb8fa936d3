"""Measurement: label-only and calibrated scoring, collapsed cells, intervals that cover, paired tests that
detect a planted difference and not a null one, and records/reports that carry all of it."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_model, write_task
from manyicl.evaluation import NaiveBackend, Prompter, SharedPrefixBackend, evaluate_cell
from manyicl.evaluation.cells import is_collapsed
from manyicl.evaluation.prompting import CONTENT_FREE_INPUTS
from manyicl.formatter import Formatter
from manyicl.task_files import load_task_dir
from manyicl.tasks import Example
from manyicl.uncertainty import average_interval, cell_interval, paired_difference

ACCURACY = lambda means: means[..., 0]  # noqa: E731


def test_constant_predictor_is_flagged():
    assert is_collapsed({"world": 200}, {"world": 50, "sports": 50, "business": 50, "science": 50})
    assert is_collapsed({"a": 181, "b": 19}, {"a": 100, "b": 100})
    assert not is_collapsed({"a": 150, "b": 50}, {"a": 100, "b": 100})
    assert not is_collapsed({"a": 195, "b": 5}, {"a": 190, "b": 10})  # the golds are that skewed themselves


def full_logprob(model, ids: list[int], start: int) -> float:
    """log P(ids[start:] | ids[:start]) from one plain forward of the whole text."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_scores_are_label_tokens_only_and_calibration_is_the_hand_computation(llama_tokenizer, data_dir):
    model, tok = tiny_model(len(llama_tokenizer), seed=3), llama_tokenizer
    task = load_task_dir(data_dir / "sst2")
    prompter = Prompter(task, tok, Formatter.for_task(task, tok), 1024)
    queries = task.test[:4]
    demos = prompter.choose_demonstrations(4, 0, True, queries)
    out = evaluate_cell(SharedPrefixBackend(model, tok), prompter, demos, queries, scoring="calibrated")
    prefix, context = prompter.prefix_ids(demos), prompter.context(demos)

    def label_logprob(text: str, label: str) -> float:
        e = prompter.encode_query(context, Example(text, ""))
        k = prompter.labels.index(label)
        assert e.answer_tokens[k] < len(e.candidates[k])  # the delimiter is NOT part of the score
        ids = prefix + e.ids + e.candidates[k][: e.answer_tokens[k]]
        return full_logprob(model, ids, len(prefix) + len(e.ids))

    for q, p in zip(queries, out.predictions):
        for label in prompter.labels:
            by_hand = label_logprob(q.input, label)
            free = math.log(np.mean([math.exp(label_logprob(x, label)) for x in CONTENT_FREE_INPUTS]))
            assert p.scores["sum"][label] == pytest.approx(by_hand, abs=1e-4)
            assert p.scores["calibrated"][label] == pytest.approx(by_hand - free, abs=1e-4)
        assert p.prediction == max(p.scores["calibrated"], key=p.scores["calibrated"].get)


def test_bootstrap_interval_covers_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    truth, covered = 0.3, 0
    for _ in range(200):
        rows = rng.binomial(1, truth, (200, 1)).astype(float)
        e = cell_interval(rows, ACCURACY, seed=int(rng.integers(1 << 30)))
        covered += e.low <= truth <= e.high
    assert 0.90 <= covered / 200 <= 1.0  # nominal 0.95 ± 0.05
    # the two-level interval (seeds and queries) covers a task mean whose seeds differ
    covered = 0
    for _ in range(100):
        seed_means = rng.normal(0.6, 0.05, 3)
        cells = [rng.binomial(1, m, (200, 1)).astype(float) for m in seed_means]
        e = average_interval([cells], [ACCURACY], seed=int(rng.integers(1 << 30)))
        covered += e.low <= 0.6 <= e.high
    assert covered / 100 >= 0.85  # three seeds: the seed level is coarse, so the check is one-sided


def test_paired_test_detects_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.6, (400, 1)).astype(float)
    better = base.copy()
    wrong = np.flatnonzero(base[:, 0] == 0)
    better[rng.choice(wrong, 40, replace=False)] = 1.0  # 10 points better on the same queries
    planted = paired_difference(better, base, ACCURACY)
    assert planted.difference == pytest.approx(0.1) and planted.low > 0 and planted.p_value < 0.01
    rejections = 0
    for k in range(100):  # two methods that agree except for symmetric noise: ~5 % false rejections
        a = rng.binomial(1, 0.6, (400, 1)).astype(float)
        b = np.where(rng.random((400, 1)) < 0.2, 1 - a, a)
        flip = rng.random((400, 1)) < 0.5
        a, b = np.where(flip, b, a), np.where(flip, a, b)
        rejections += paired_difference(a, b, ACCURACY, seed=k).p_value < 0.05
    assert rejections <= 12


def test_paired_contrast_measures_a_change_of_a_difference_on_the_same_queries():
    """(a1 − b1) − (a0 − b0): a gain planted only at condition 1 is found, with an interval that pairs every query
    across the four cells; where nothing changed between the conditions the change is exactly zero."""
    from manyicl.uncertainty import paired_contrast

    rng = np.random.default_rng(2)
    b = rng.binomial(1, 0.5, (400, 1)).astype(float)
    a0 = b.copy()
    a1 = b.copy()
    a1[rng.choice(np.flatnonzero(b[:, 0] == 0), 40, replace=False)] = 1.0  # +0.1 over b at condition 1 only
    grew = paired_contrast([[a1, b, a0, b]], (1, -1, -1, 1), [ACCURACY])
    assert grew.difference == pytest.approx(0.1) and grew.low > 0 and grew.p_value < 0.01
    same = paired_contrast([[a1, b, a1, b]], (1, -1, -1, 1), [ACCURACY])
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    assert paired_contrast([[a1, b]], (1, -1), [ACCURACY]) == paired_difference(a1, b, ACCURACY)


def test_cloze_multiple_choice_scores_the_option_texts(llama_tokenizer, data_dir):
    model, tok = tiny_model(len(llama_tokenizer)), llama_tokenizer
    task = load_task_dir(data_dir / "arc_challenge")
    queries = task.test[:3]
    cloze = Prompter(task, tok, Formatter.for_task(task, tok), 2048)
    letter = Prompter(task, tok, Formatter.for_task(task, tok, multiple_choice="letter"), 2048)
    assert (cloze.answer_form, letter.answer_form) == ("cloze", "letter")
    demos = cloze.choose_demonstrations(2, 0, True, queries)
    assert demos[0].choices[ord(demos[0].output) - 65] in tok.decode(cloze.prefix_ids(demos))  # demos show the text
    e = cloze.encode_query(cloze.context(demos), queries[0])
    assert len(e.candidates) == len(queries[0].choices) and e.answer_chars == [len(c) for c in queries[0].choices]
    out = evaluate_cell(SharedPrefixBackend(model, tok), cloze, demos, queries, scoring="per_char")
    naive = evaluate_cell(NaiveBackend(model, tok), cloze, demos, queries, scoring="per_char")
    assert [p.prediction for p in out.predictions] == [p.prediction for p in naive.predictions]
    assert all(p.prediction in "ABCDE" and set(p.scores["sum"]) == {chr(65 + i) for i in range(len(q.choices))}
               for p, q in zip(out.predictions, queries))
    assert out.answer_form == "cloze" and set(out.gold_counts) <= set("ABCDE")
    assert evaluate_cell(SharedPrefixBackend(model, tok), letter, demos, queries).answer_form == "letter"


def test_records_carry_intervals_histograms_scores_and_skips(tiny_model_dir, data_dir, tmp_path):
    from conftest import tiny_config
    from manyicl.config import ExperimentConfig
    from manyicl.evaluation import run_evaluation
    from manyicl.report import write_report

    long_query = {"input": "long " * 300, "output": "no"}
    d = write_task(tmp_path / "data" / "t", [{"input": f"x{i}", "output": ["yes", "no"][i % 2]} for i in range(20)],
                   [{"input": f"q{i}", "output": ["yes", "no"][i % 2]} for i in range(9)] + [long_query],
                   "family: classification\n")
    cfg = tiny_config(tiny_model_dir, tmp_path / "data", tmp_path / "out")
    cfg["evaluation"] = {"shots": [4], "seeds": [0, 1], "max_tokens": 256}
    config = ExperimentConfig.model_validate(cfg)
    with pytest.warns(UserWarning, match="1 queries too long"):
        results = run_evaluation(config, [(load_task_dir(d), "held_out")])
    for r in results:
        assert r["n"] == 10 and r["skipped"] == 1 and r["ci_low"] <= r["value"] <= r["ci_high"]
        assert sum(r["prediction_counts"].values()) == 9 and r["gold_counts"] == {"no": 5, "yes": 5}
        assert r["demo_labels"] == {"yes": 2, "no": 2} and r["scoring"] == config.evaluation.scoring
        lines = [json.loads(line) for line in (tmp_path / "out" / r["predictions"]).read_text().splitlines()]
        assert len(lines) == 10 and lines[-1]["skipped"] and lines[-1]["metric_row"] == [0.0]  # wrong, not dropped
        assert set(lines[0]["scores"]) == {"sum", "mean", "per_char", "calibrated"}
        assert r["value"] == pytest.approx(np.mean([line["metric_row"][0] for line in lines]))
    report = write_report(tmp_path / "out").read_text()
    assert "[" in report.split("| t |")[1].splitlines()[0]  # the cell shows its interval
    assert "too long for the context (scored as wrong, kept in every denominator): 2" in report


def cell_record(**fields):
    """A cell record with what a test does not care about filled in."""
    from manyicl.evaluation.records import CellRecord

    defaults = {"model": "m", "method": "base", "task": "t", "family": "classification", "metric": "accuracy",
                "shots": 0, "shots_requested": 0, "seed": 0, "value": 0.0, "n": 10}
    return CellRecord(**(defaults | fields))


def context_of(run_dir, cells):
    from manyicl.reporting.context import build_context

    return build_context(run_dir, [r for c in cells.values() for r in c.records], cells)


def test_shot_scaling_plot_draws_two_requests_that_use_the_same_shots(tmp_path):
    """32 and max both used 26 demonstrations on agnews (no more fit) and scored differently: the shot-scaling plot
    draws both points instead of failing to order them (it once compared their estimates)."""
    from manyicl.reporting import plots
    from manyicl.reporting.analysis import Cell

    def cell(k, used, correct):
        record = cell_record(task="agnews", shots_requested=k, shots=used)
        return Cell([record], {0: np.array([[1.0]] * correct + [[0.0]] * (10 - correct))})

    cells = {("base", "agnews", "32"): cell(32, 26, 6), ("base", "agnews", "max"): cell("max", 26, 7)}
    assert plots.shot_scaling(context_of(tmp_path, cells)) == tmp_path / "plots" / "shot_scaling.png"


def test_every_method_has_one_colour_of_its_own():
    """A reader matches a method's lines across figures by colour: each of the comparison's methods has its own."""
    from manyicl.methods import METHODS
    from manyicl.reporting.plots import METHOD_COLOURS

    assert set(METHOD_COLOURS) == set(METHODS)
    assert len(set(METHOD_COLOURS.values())) == len(METHODS)


def test_training_curves_keep_method_colours_and_tell_per_task_fine_tunes_apart(tmp_path, monkeypatch):
    """The mixture panel draws each method in its own colour (the one every other figure gives it, whichever methods
    the run has), and the task_level panel gives each of 11 per-task fine-tunes a different colour (the default cycle
    has 10: the 11th once repeated the first)."""
    from dataclasses import replace

    from manyicl.reporting import plots
    from manyicl.reporting.analysis import Cell

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda plt, fig, run_dir, name: drawn.setdefault(name, fig))
    log = [{"step": s, "loss": 1.0 / s} for s in range(1, 41)]
    logs = {"manyicl": log, "zero_shot_ft": log} | {f"task_level/task{i}": log for i in range(11)}
    ctx = context_of(tmp_path, {("base", "t", "0"): Cell([cell_record()], {0: np.array([[1.0]])})})
    plots.training_curves(replace(ctx, training_logs=logs))
    mixture, per_task = drawn["training_curves.png"].axes
    assert {line.get_label(): line.get_color() for line in mixture.get_lines()} == {
        "manyicl": plots.method_colour("manyicl"), "zero_shot_ft": plots.method_colour("zero_shot_ft")}
    assert len({line.get_color() for line in per_task.get_lines()}) == 11


def test_cloze_gold_letter_outside_its_choices(tiny_model_dir, tmp_path):
    from conftest import tiny_config
    from manyicl.config import ExperimentConfig
    from manyicl.errors import ManyICLError
    from manyicl.evaluation import run_evaluation

    record = {"input": "Question: 1+1?\nA. 2\nB. 3", "output": "A", "choices": ["2", "3"]}
    d = write_task(tmp_path / "data" / "mc", [record] * 4, [record, {**record, "output": "C"}],
                   "family: multiple_choice\n")
    config = ExperimentConfig.model_validate(tiny_config(tiny_model_dir, tmp_path / "data", tmp_path / "out"))
    with pytest.raises(ManyICLError, match=r"test.jsonl:2: answer 'C' is not a letter of its 2 choices"):
        run_evaluation(config, [(load_task_dir(d), "held_out")])
    assert not (tmp_path / "out").exists()


def test_gap_closed_on_the_average_is_the_ratio_of_average_differences_with_an_interval(tmp_path):
    """Two tasks: base 0.2/0.4, manyicl 0.5/0.6, task_level 0.8/0.6 -> per task 0.50 and 1.00; on the average
    (0.3, 0.55, 0.7) the gap is 0.25/0.4 = 0.625, not the mean of the two ratios; every figure has an interval."""
    from manyicl.reporting import sections
    from manyicl.reporting.analysis import Cell, TaskGroup, gap_closed
    from manyicl.reporting.text import fmt, fmt_gap

    def cell(method, task, k, correct, n=200, seeds=(0, 1)):
        record = cell_record(method=method, task=task, shots_requested=k, shots=8, n=n)
        rows = np.array([[1.0]] * correct + [[0.0]] * (n - correct))
        return Cell([record], {s: rows for s in seeds})

    cells = {}
    for task, (b, m, t) in {"a": (40, 100, 160), "b": (80, 120, 120)}.items():
        cells["base", task, "8"] = cell("base", task, 8, b)
        cells["manyicl", task, "8"] = cell("manyicl", task, 8, m)
        cells["task_level", task, "0"] = cell("task_level", task, 0, t, seeds=(0,))
    table = gap_closed(cells, ["a", "b"], "8", [TaskGroup("average", ["a", "b"])])
    assert [g.tasks_averaged for g in table.per_task.values()] == [None, None]
    assert list(table.per_group) == ["average"] and table.per_group["average"].tasks_averaged == 2
    assert table.headline() is table.per_group["average"]
    assert fmt_gap(table.per_task["a"]).startswith("0.50 [") and fmt_gap(table.per_task["b"]).startswith("1.00 [")
    lines = sections.gap_closed(context_of(tmp_path, cells))
    assert any(line.startswith("| **average** (2 tasks) |") for line in lines)
    estimates, gap = table.per_group["average"].estimates, fmt_gap(table.per_group["average"])
    assert [round(e.value, 3) for e in estimates] == [0.3, 0.55, 0.7]
    assert all(e.low < e.value < e.high for e in estimates) and all("[" in fmt(e) for e in estimates)
    value, low, high = (float(x) for x in gap.replace("[", "").replace("]", "").replace(",", "").split())
    assert value in (0.62, 0.63) and low < value < high  # 0.625 to two places


def test_ordering_without_collapsed_tasks_leaves_out_every_task_where_one_method_collapsed(tmp_path):
    """A task where any method's cell is collapsed (⚠) leaves the second ordering, for every method alike; a run
    without such a cell has no second ordering."""
    from manyicl.reporting.analysis import Cell
    from manyicl.reporting.sections import ordering_without_collapsed

    def cell(method, task, correct, collapsed=False, n=50):
        record = cell_record(method=method, task=task, shots_requested=8, shots=8, n=n, collapsed=collapsed)
        rows = np.array([[1.0]] * correct + [[0.0]] * (n - correct))
        return Cell([record], {0: rows, 1: rows})

    def cells(collapsed):
        return {(m, t, "8"): cell(m, t, correct, collapsed=(m, t) == collapsed)
                for t, scores in {"a": (10, 40), "b": (20, 30), "c": (45, 5)}.items()
                for m, correct in zip(("base", "manyicl"), scores)}

    assert ordering_without_collapsed(context_of(tmp_path, cells(collapsed=None))) == []
    lines = ordering_without_collapsed(context_of(tmp_path, cells(collapsed=("base", "c"))))
    assert lines[0].startswith("## Method ordering without the ⚠ tasks (average over the other 2 held-out tasks")
    assert lines[2].startswith("Left out: c,")
    # the averages over a and b only: manyicl (40 + 30) / 100, base (10 + 20) / 100
    rows = {line.split(" | ")[0]: line.split(" | ")[1] for line in lines if line.startswith(("| manyicl", "| base"))}
    assert rows["| manyicl"].startswith("0.700 [") and rows["| base"].startswith("0.300 [")


def test_majority_score_is_the_metric_of_always_giving_the_most_frequent_gold(tmp_path):
    """rte's 200 queries (112 entailment): 0.560 accuracy; tweeteval_hate's (113 not hate): macro-F1 of the one
    class, 2*113 / (2*113 + 87), over two labels; a generated-answer task has none. The held-out table shows it."""
    from manyicl.reporting.analysis import Cell, majority_score
    from manyicl.reporting.sections import held_out_table

    def cell(task, metric, golds):
        record = cell_record(task=task, metric=metric, shots_requested=8, shots=8, n=200, gold_counts=golds)
        return Cell([record], {0: np.zeros((200, 1))})

    rte = cell("rte", "accuracy", {"entailment": 112, "not entailment": 88})
    hate = cell("hate", "macro_f1", {"hate": 87, "not hate": 113})
    assert majority_score(rte) == pytest.approx(0.56)
    assert majority_score(hate) == pytest.approx(226 / 313 / 2)
    assert majority_score(cell("lama", "exact_match", None)) is None
    table = held_out_table(context_of(tmp_path, {("base", "rte", "8"): rte, ("base", "lama", "8"): cell(
        "lama", "exact_match", None)}))
    assert any(line.startswith("| rte | classification | accuracy | 0.560 |") for line in table)
    assert any(line.startswith("| lama | classification | exact_match | – |") for line in table)


def test_collapsed_cells_are_counted_per_task_and_method_before_they_are_listed(tmp_path):
    from manyicl.reporting.analysis import load_cells
    from manyicl.reporting.context import build_context
    from manyicl.reporting.sections import collapsed_cells

    def record(method, seed, collapsed):
        return cell_record(method=method, task="rte", shots_requested=8, seed=seed, collapsed=collapsed,
                           prediction_counts={"no": 10} if collapsed else {"no": 5, "yes": 5},
                           gold_counts={"no": 5, "yes": 5})

    records = [record("base", 0, True), record("base", 1, True), record("manyicl", 0, False),
               record("manyicl", 1, True)]
    lines = collapsed_cells(build_context(tmp_path, records, load_cells(tmp_path, records)))
    assert "| rte | 2 of 2 | 1 of 2 |" in lines
    assert sum(line.startswith("| base | rte |") or line.startswith("| manyicl | rte |") for line in lines) == 3


def test_shot_scaling_table_gives_the_average_per_shot_count_and_the_gain_over_zero_shots(tmp_path):
    from manyicl.reporting.analysis import Cell
    from manyicl.reporting.sections import shot_scaling

    def cell(k, correct, seeds):
        record = cell_record(shots_requested=k, shots=k, n=100)
        return Cell([record], {s: np.array([[1.0]] * correct + [[0.0]] * (100 - correct)) for s in seeds})

    cells = {("base", "t", "0"): cell(0, 20, (0,)), ("base", "t", "8"): cell(8, 60, (0, 1))}
    lines = shot_scaling(context_of(tmp_path, cells))
    row = next(line for line in lines if line.startswith("| base |"))
    assert row.startswith("| base | 0.200 [") and "| 0.600 [" in row and "**+0.400 [" in row


def test_a_paired_difference_over_seeds_is_the_difference_of_the_tables_seed_means():
    """The tables average a metric over seeds; the paired test must estimate the difference of those averages.
    Pooling the seeds' queries first gives another number where the metric is not a mean over queries: here each
    seed of b answers one label to every query (macro-F1 1/3 per seed) but the two seeds pooled answer both labels
    (macro-F1 1/2). (The real run's report said manyicl − few_shot_ft +0.004 beside averages 0.357 and 0.346.)"""
    from manyicl.metrics import metric_rows
    from manyicl.reporting.analysis import Cell, CellId, average, paired_over

    labels = ["hate", "not hate"]
    golds = [["hate"] if i % 2 else ["not hate"] for i in range(40)]
    rng = np.random.default_rng(0)

    def cell(method, predictions_by_seed):
        record = cell_record(method=method, task="t", metric="macro_f1", shots_requested="max", shots=8, n=40)
        return Cell([record], {s: metric_rows("macro_f1", p, golds, labels) for s, p in predictions_by_seed.items()})

    cells = {CellId("a", "t", "max"): cell("a", {s: list(rng.choice(labels, size=40)) for s in (0, 1)}),
             CellId("b", "t", "max"): cell("b", {0: ["hate"] * 40, 1: ["not hate"] * 40})}
    b = average(cells, "b", ["t"], "max").value
    assert b == pytest.approx(1 / 3)
    difference = paired_over(cells, "a", "b", ["t"], "max")
    assert difference.difference == pytest.approx(average(cells, "a", ["t"], "max").value - b)
    assert difference.low < difference.difference < difference.high
