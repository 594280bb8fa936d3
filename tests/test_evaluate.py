"""Evaluation: the prefix cache gives the naive path's predictions and log-probs; outputs, resume, errors."""

import json

import pytest
import torch

from conftest import tiny_config, write_task
from manyicl.config import ExperimentConfig
from manyicl.errors import ManyICLError
from manyicl.evaluate import CellEvaluator, run_evaluation
from manyicl.formatter import Formatter
from manyicl.tasks import load_task_dir


def evaluate_both(model, tokenizer, task, shots, queries, max_tokens=512):
    outs = []
    for cached in (True, False):
        ev = CellEvaluator(model, tokenizer, task, Formatter.for_task(task, tokenizer), max_tokens, prefix_cache=cached, batch_size=3)
        demos = ev.choose_demonstrations(shots, 0, False, queries)
        outs.append(ev.run(demos, queries))
    return outs


def assert_same(cached, naive):
    assert cached.shots == naive.shots and cached.prefix_tokens == naive.prefix_tokens
    assert [p.prediction for p in cached.predictions] == [p.prediction for p in naive.predictions]
    for a, b in zip(cached.predictions, naive.predictions):
        if a.scores:
            assert a.scores.keys() == b.scores.keys()
            for k in a.scores:
                assert abs(a.scores[k] - b.scores[k]) < 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from manyicl.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("name, shots", [("agnews", 2), ("gsm8k", 2), ("goemotions", 4), ("sst2", "max"), ("sst2", 0)])
def test_prefix_cache_equals_naive_tiny(tiny, data_dir, name, shots):
    model, tokenizer = tiny
    task = load_task_dir(data_dir / name)
    cached, naive = evaluate_both(model, tokenizer, task, shots, task.test[:4])
    assert_same(cached, naive)
    assert cached.shots == (shots if shots != "max" else cached.shots) and not cached.skipped


@pytest.mark.slow
def test_prefix_cache_equals_naive_smollm2(data_dir):
    from manyicl.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    for name, shots in [("sst2", 16), ("lama_P36", 8)]:
        task = load_task_dir(data_dir / name)
        cached, naive = evaluate_both(model, tokenizer, task, shots, task.test[:3], max_tokens=1024)
        assert_same(cached, naive)
        assert cached.prefix_tokens > 50
    task = load_task_dir(data_dir / "lama_P36")  # chat-template mode: generation stops at the end of the turn
    task.template["chat"] = True
    cached, naive = evaluate_both(model, tokenizer, task, 8, task.test[:2], max_tokens=1024)
    assert_same(cached, naive)
    assert all("<|im_end|>" not in p.prediction for p in cached.predictions)


def test_run_evaluation_outputs_and_resume(tiny_model_dir, data_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "out")
    cfg["tasks"].update(held_out=["sst2", "lama_P36"], forgetting=["mmlu"])
    cfg["evaluation"] = {"shots": [0, 3], "seeds": [0, 1], "max_queries": 3, "forgetting_shots": [2], "max_tokens": 2048}
    config = ExperimentConfig.model_validate(cfg)
    from manyicl.train import load_tasks

    tasks = [(t, "held_out") for t in load_tasks(config, config.tasks.held_out)]
    tasks += [(t, "forgetting") for t in load_tasks(config, config.tasks.forgetting)]
    results = run_evaluation(config, tasks)
    assert len(results) == 2 * 2 * 2 + 1 * 2
    r = results[0]
    for key in ("model", "adapter", "method", "task", "family", "metric", "shots", "seed", "value", "n", "prefix_tokens", "seconds"):
        assert key in r
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == results
    lines = (tmp_path / "out" / "predictions" / "base" / "sst2_shots3_seed1.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "prediction" in json.loads(lines[0])
    mmlu = [x for x in results if x["task"] == "mmlu"]
    assert mmlu[0]["role"] == "forgetting" and mmlu[0]["shots"] == 2
    # a rerun does nothing new; dropping a cell (an interrupted run) recomputes just that cell
    assert run_evaluation(config, tasks) == results
    (tmp_path / "out" / "results.json").write_text(json.dumps(results[:-1]))
    again = run_evaluation(config, tasks)
    assert len(again) == len(results) and again[:-1] == results[:-1]


def test_query_overflow_is_skipped_and_counted(tiny, tmp_path):
    model, tokenizer = tiny
    d = write_task(tmp_path / "t", [{"input": f"x{i}", "output": "yes" if i % 2 else "no"} for i in range(10)],
                   [{"input": "short", "output": "yes"}, {"input": "long " * 400, "output": "no"}],
                   "family: classification\n")
    task = load_task_dir(d)
    ev = CellEvaluator(model, tokenizer, task, Formatter.for_task(task), 128)
    demos = ev.choose_demonstrations(2, 0, False, task.test)
    out = ev.run(demos, task.test)
    assert out.skipped == 1 and out.predictions[1].skipped and not out.predictions[0].skipped


def test_bad_evaluation_input(tiny_model_dir, data_dir, tmp_path):
    d = write_task(tmp_path / "data" / "t", [{"input": "a", "output": "yes"}, {"input": "b", "output": "no"}],
                   [{"input": "c", "output": "maybe"}], "family: classification\n")
    cfg = tiny_config(tiny_model_dir, tmp_path / "data", tmp_path / "out")
    cfg["evaluation"] = {"shots": [1], "max_queries": 2}
    config = ExperimentConfig.model_validate(cfg)
    task = load_task_dir(d)
    with pytest.raises(ManyICLError, match=r"test.jsonl:1: gold label 'maybe' is not in the label set"):
        run_evaluation(config, [(task, "held_out")])
    task.test[0] = task.train[0]
    config.evaluation.shots = [5]
    with pytest.raises(ManyICLError, match="shots=5 is larger than its train split"):
        run_evaluation(config, [(task, "held_out")])
    assert not (tmp_path / "out" / "results.json").exists()


def test_adapter_for_another_base_model(tiny_model_dir, tmp_path, llama_tokenizer):
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_model
    from manyicl.models import load_model

    other = tiny_model(len(llama_tokenizer), hidden=32, layers=3)
    other.save_pretrained(tmp_path / "other")
    peft = get_peft_model(other, LoraConfig(r=2, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ManyICLError, match="adapter .* (was trained on|does not fit)"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))


def test_predict_cli(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from manyicl.cli import main

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"input": f"item {i}", "output": ["cat", "dog"][i % 2]}) + "\n" for i in range(8)))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"input": "first"}) + "\n" + json.dumps({"input": "second", "output": "dog"}) + "\n")
    out = tmp_path / "pred.jsonl"
    result = CliRunner().invoke(main, ["predict", "--model", str(tiny_model_dir), "--demos", str(demos), "--inputs",
                                       str(inputs), "--shots", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["input"] for l in lines] == ["first", "second"]
    assert all(l["prediction"] in ("cat", "dog") for l in lines) and lines[1]["output"] == "dog" and "output" not in lines[0]
    bad = CliRunner().invoke(main, ["predict", "--model", str(tiny_model_dir), "--demos", str(demos), "--inputs",
                                    str(inputs), "--shots", "4", "--output", str(out), "--labels", "cat,bird"])
    assert bad.exit_code == 2 and "'dog' is not in --labels" in bad.stderr
