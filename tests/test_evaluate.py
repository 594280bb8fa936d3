"""Evaluation: the prefix cache gives the naive path's predictions and log-probs; outputs, resume, errors."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config, tiny_model, write_task
from manyicl.config import ExperimentConfig
from manyicl.errors import ManyICLError
from manyicl.evaluation import NaiveBackend, Prompter, SharedPrefixBackend, evaluate_cell, hf_backend, run_evaluation
from manyicl.evaluation.prompting import CONTENT_FREE_INPUTS
from manyicl.formatter import Formatter
from manyicl.task_files import load_task_dir


def evaluate_both(model, tokenizer, task, shots, queries, max_tokens=1024, batch_tokens=256):
    """The same cell through the shared-prefix backend (small groups: several per cell) and the naive one."""
    def prompter():  # one per backend: neither reuses the other's calibration (Prompter.calibration)
        return Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), max_tokens)

    demos = prompter().choose_demonstrations(shots, 0, False, queries)
    backends = (SharedPrefixBackend(model, tokenizer, batch_tokens), NaiveBackend(model, tokenizer))
    return [evaluate_cell(b, prompter(), demos, queries) for b in backends]


def assert_same(cached, naive, tolerance=1e-4):
    assert cached.shots == naive.shots and cached.prefix_tokens == naive.prefix_tokens
    assert [p.prediction for p in cached.predictions] == [p.prediction for p in naive.predictions]
    for a, b in zip(cached.predictions, naive.predictions):
        assert (a.scores is None) == (b.scores is None)
        if a.scores:  # every scoring (sum, mean, per_char, calibrated) of every candidate
            assert a.scores.keys() == b.scores.keys()
            for scoring in a.scores:
                assert a.scores[scoring].keys() == b.scores[scoring].keys()
                for k in a.scores[scoring]:
                    assert abs(a.scores[scoring][k] - b.scores[scoring][k]) < tolerance


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from manyicl.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


CELLS = [("agnews", 2), ("rte", 3), ("arc_challenge", 2), ("gsm8k", 2), ("goemotions", 4), ("lama_P36", 3),
         ("sst2", "max"), ("sst2", 0)]


@pytest.mark.parametrize("name, shots", CELLS)
def test_shared_prefix_equals_naive_gqa(tiny, data_dir, name, shots):
    """A grouped-query Llama (4 query heads, 2 key/value heads): every family, several groups per cell."""
    model, tokenizer = tiny
    task = load_task_dir(data_dir / name)
    cached, naive = evaluate_both(model, tokenizer, task, shots, task.test[:5])
    assert_same(cached, naive)
    assert not cached.skipped
    if shots != "max":
        assert cached.shots == shots
    else:  # "max" really is the most that fit: one more demonstration of the same seeded order would overflow
        prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024)
        more = [task.train[i] for i in task.order(random.Random(f"eval:{task.name}:0"))[: cached.shots + 1]]
        need = max(prompter.query_budget(prompter.encode_query("", q)) for q in task.test[:5])
        assert cached.shots > 0 and len(prompter.prefix_ids(more)) + need > 1024


@pytest.fixture(scope="module")
def tiny_no_gqa(llama_tokenizer):
    return tiny_model(len(llama_tokenizer), arch="qwen2", kv_heads=4, seed=1), llama_tokenizer


@pytest.mark.parametrize("name, shots", CELLS[:6])
def test_shared_prefix_equals_naive_without_gqa(tiny_no_gqa, data_dir, name, shots):
    model, tokenizer = tiny_no_gqa
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    task = load_task_dir(data_dir / name)
    assert_same(*evaluate_both(model, tokenizer, task, shots, task.test[:5]))


def test_sliding_window_falls_back_to_the_exact_path(llama_tokenizer, data_dir):
    model = tiny_model(len(llama_tokenizer), arch="mistral", sliding_window=16)
    with pytest.warns(UserWarning) as caught:
        backend = hf_backend(model, llama_tokenizer, 512)
    assert isinstance(backend, NaiveBackend)
    [notice] = [str(w.message) for w in caught]
    assert "sliding-window attention (16 tokens)" in notice and "exact path" in notice and "\n" not in notice
    # why: the block mask ignores the window, so the shared prefix would NOT reproduce the model
    task = load_task_dir(data_dir / "sst2")
    cached, naive = evaluate_both(model, llama_tokenizer, task, 6, task.test[:3])
    assert max(abs(a.scores["sum"][k] - b.scores["sum"][k]) for a, b in zip(cached.predictions, naive.predictions)
               for k in a.scores["sum"]) > 1e-3
    assert hf_backend(tiny_model(len(llama_tokenizer)), llama_tokenizer, 512).__class__ is SharedPrefixBackend


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("name, n", [("sst2", 32), ("lama_P36", 12)])
def test_batch_composition_does_not_change_predictions(llama_tokenizer, data_dir, name, n, monkeypatch):
    """A query alone and in a group of 32 give the same answer and log-probs."""
    import manyicl.evaluation.backend_hf as backend_hf

    monkeypatch.setattr(backend_hf, "MIN_GROUP_TOKENS", 100_000)  # a short prefix would otherwise cap the group
    monkeypatch.setattr(backend_hf, "SCORE_GROUP_TOKENS", 100_000)  # so would scoring's own group size
    model = tiny_model(len(llama_tokenizer))
    calls = count_forwards(model)
    task = load_task_dir(data_dir / name)
    queries = task.test[:n]
    prompter = Prompter(task, llama_tokenizer, Formatter.for_task(task, llama_tokenizer), 1024)
    demos = prompter.choose_demonstrations(4, 0, False, queries)
    grouped = evaluate_cell(SharedPrefixBackend(model, llama_tokenizer, batch_tokens=100_000), prompter, demos, queries)
    grouped_calls = len(calls)
    prompter = Prompter(task, llama_tokenizer, Formatter.for_task(task, llama_tokenizer), 1024)  # calibrated anew
    alone = evaluate_cell(SharedPrefixBackend(model, llama_tokenizer, batch_tokens=1), prompter, demos, queries)
    assert_same(grouped, alone, tolerance=1e-5)
    if prompter.ranked:  # one forward for the prefix and ONE for all 32 queries with their candidates
        assert grouped_calls == 2 and len(calls) - grouped_calls == 1 + n + len(CONTENT_FREE_INPUTS)
    else:  # decoding steps are shared by the group: far fewer forwards than one query at a time
        assert grouped_calls < (len(calls) - grouped_calls) / 4


def test_calibration_is_measured_once_per_prefix_and_equals_measuring_it_again(tiny, data_dir):
    """A served task's later requests reuse its content-free scores: only their own queries are scored, and the
    calibrated scores equal a fresh measurement's."""
    model, tokenizer = tiny
    task = load_task_dir(data_dir / "sst2")
    backend = SharedPrefixBackend(model, tokenizer, 256)
    scored = []
    real_score = backend.score
    backend.score = lambda prefix, queries, candidates: scored.append(len(queries)) or real_score(prefix, queries,
                                                                                                 candidates)
    prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024)
    demos = prompter.choose_demonstrations(4, 0, False, task.test[:5])
    evaluate_cell(backend, prompter, demos, task.test[:3], "calibrated")
    later = evaluate_cell(backend, prompter, demos, task.test[3:5], "calibrated")
    assert scored == [3 + len(CONTENT_FREE_INPUTS), 2]
    fresh = evaluate_cell(backend, Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024), demos,
                          task.test[3:5], "calibrated")
    assert scored[-1] == 2 + len(CONTENT_FREE_INPUTS)
    assert [p.prediction for p in later.predictions] == [p.prediction for p in fresh.predictions]
    for a, b in zip(later.predictions, fresh.predictions):
        for label, value in a.scores["calibrated"].items():
            assert abs(value - b.scores["calibrated"][label]) < 1e-5
    # another prefix (other demonstrations) is calibrated anew
    evaluate_cell(backend, prompter, demos[:2], task.test[:1], "calibrated")
    assert scored[-1] == 1 + len(CONTENT_FREE_INPUTS)


def test_prefix_is_written_once_in_place(tiny, data_dir):
    model, tokenizer = tiny
    task = load_task_dir(data_dir / "sst2")
    prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024)
    demos = prompter.choose_demonstrations(8, 0, False, task.test[:20])
    prefix = prompter.prefix_ids(demos)
    backend = SharedPrefixBackend(model, tokenizer, batch_tokens=64)  # several groups
    evaluate_cell(backend, prompter, demos, task.test[:10])
    layer = backend._store.layers[0]
    buffer, written = layer._keys.data_ptr(), layer._keys[..., : len(prefix), :].clone()
    evaluate_cell(backend, prompter, demos, task.test[10:20])  # same cell: the prefix is not recomputed or copied
    assert layer._keys.data_ptr() == buffer and torch.equal(layer._keys[..., : len(prefix), :], written)
    assert layer.length == len(prefix) and layer.capacity >= len(prefix) + 64


@pytest.mark.slow
def test_shared_prefix_equals_naive_smollm2(data_dir):
    from manyicl.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    for name, shots in [("sst2", 16), ("lama_P36", 8)]:
        task = load_task_dir(data_dir / name)
        cached, naive = evaluate_both(model, tokenizer, task, shots, task.test[:4], max_tokens=1024)
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
    cfg["evaluation"] = {"shots": [0, 3], "seeds": [0, 1], "max_queries": 3, "forgetting_shots": [2],
                         "max_tokens": 2048}
    config = ExperimentConfig.model_validate(cfg)
    from manyicl.catalog import load_tasks

    tasks = [(t, "held_out") for t in load_tasks(config.tasks, config.tasks.held_out)]
    tasks += [(t, "forgetting") for t in load_tasks(config.tasks, config.tasks.forgetting)]
    results = run_evaluation(config, tasks)
    assert len(results) == 2 * (1 + 2) + 1 * 2  # 0 shots: one cell (no demonstrations to draw), 3 shots: one per seed
    r = results[0]
    for key in ("model", "adapter", "method", "task", "family", "metric", "shots", "seed", "value", "n",
                "prefix_tokens", "seconds"):
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


def test_cells_with_the_same_prompts_are_run_once(tiny_model_dir, data_dir, tmp_path):
    """100 shots where only a few fit is the max cell: run once, recorded twice; the same as running max alone."""
    from manyicl.catalog import load_tasks

    def evaluate(out, shots):
        cfg = tiny_config(tiny_model_dir, data_dir, out)
        cfg["tasks"].update(held_out=["sst2"])
        cfg["evaluation"] = {"shots": shots, "seeds": [0], "max_queries": 3, "max_tokens": 256}
        config = ExperimentConfig.model_validate(cfg)
        return run_evaluation(config, [(t, "held_out") for t in load_tasks(config.tasks, config.tasks.held_out)])

    with pytest.warns(UserWarning, match="only"):
        both = {r["shots_requested"]: r for r in evaluate(tmp_path / "both", [100, "max"])}
    alone = evaluate(tmp_path / "alone", ["max"])[0]
    assert (both["max"]["same_prompts_as"] == 100 and both["max"]["seconds"] == 0.0
            and "same_prompts_as" not in both[100])
    for key in ("shots", "value", "ci_low", "ci_high", "prefix_tokens"):
        assert both[100][key] == both["max"][key] == alone[key]
    read = lambda out, r: (out / r["predictions"]).read_text()  # noqa: E731
    assert read(tmp_path / "both", both["max"]) == read(tmp_path / "both", both[100]) == read(tmp_path / "alone", alone)


def test_query_overflow_is_skipped_and_counted(tiny, tmp_path):
    model, tokenizer = tiny
    d = write_task(tmp_path / "t", [{"input": f"x{i}", "output": "yes" if i % 2 else "no"} for i in range(10)],
                   [{"input": "short", "output": "yes"}, {"input": "long " * 400, "output": "no"}],
                   "family: classification\n")
    task = load_task_dir(d)
    prompter = Prompter(task, tokenizer, Formatter.for_task(task), 128)
    demos = prompter.choose_demonstrations(2, 0, False, task.test)
    out = evaluate_cell(hf_backend(model, tokenizer, 128), prompter, demos, task.test)
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
    # the architecture when the base is known, else the weights that do not fit
    with pytest.raises(ManyICLError,
                       match="adapter .* was trained on|safetensors: cannot be loaded on model .*; load it on"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))


def test_evaluation_merges_a_lora_adapter_with_the_same_scores(tiny_model_dir, data_dir, tmp_path):
    """run_evaluation merges the adapter it loads (models.for_inference): the same predictions and values as the
    unmerged PeftModel, and a merged model holds no LoRA layer. Ranked tasks: a random tiny model's greedy text
    can flip at a near-tie under float rounding, a candidate ranking with scores this far apart does not."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from manyicl.catalog import load_tasks
    from manyicl.models import for_inference, load_model, load_tokenizer

    torch.manual_seed(0)
    peft = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # a non-zero update, so merging changes the weights
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(tmp_path / "adapter")
    assert not any("lora" in n for n, _ in
                   for_inference(load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))).named_parameters())

    def evaluate(out, **how):
        cfg = tiny_config(tiny_model_dir, data_dir, out)
        cfg["tasks"].update(held_out=["sst2", "rte"])
        cfg["evaluation"] = {"shots": [2], "seeds": [0], "max_queries": 4, "max_tokens": 512}
        config = ExperimentConfig.model_validate(cfg)
        tasks = [(t, "held_out") for t in load_tasks(config.tasks, config.tasks.held_out)]
        return run_evaluation(config, tasks, "ft", **how)

    merged = evaluate(tmp_path / "merged", adapter=str(tmp_path / "adapter"))
    unmerged = evaluate(tmp_path / "unmerged", loaded=(peft.eval(), load_tokenizer(str(tiny_model_dir))))
    assert isinstance(peft, PeftModel)  # a caller's model is evaluated as given, not merged
    for a, b in zip(merged, unmerged):
        assert a["value"] == b["value"] and a["prediction_counts"] == b["prediction_counts"]
        rows = [[json.loads(line) for line in (tmp_path / run / r["predictions"]).read_text().splitlines()]
                for run, r in (("merged", a), ("unmerged", b))]
        assert [x["prediction"] for x in rows[0]] == [x["prediction"] for x in rows[1]]
        for x, y in zip(*rows):  # the same scores up to float rounding (the update is added in another order)
            for scoring in x.get("scores") or {}:
                for label, value in x["scores"][scoring].items():
                    assert abs(value - y["scores"][scoring][label]) < 1e-4


def test_predict_cli(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from manyicl.cli import main

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"input": f"item {i}", "output": ["cat", "dog"][i % 2]}) + "\n"
                             for i in range(8)))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"input": "first"}) + "\n" + json.dumps({"input": "second", "output": "dog"}) + "\n")
    out = tmp_path / "pred.jsonl"
    result = CliRunner().invoke(main, ["predict", "--model", str(tiny_model_dir), "--demos", str(demos), "--inputs",
                                       str(inputs), "--shots", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["input"] for line in lines] == ["first", "second"]
    assert (all(line["prediction"] in ("cat", "dog") for line in lines) and lines[1]["output"] == "dog"
            and "output" not in lines[0])
    bad = CliRunner().invoke(main, ["predict", "--model", str(tiny_model_dir), "--demos", str(demos), "--inputs",
                                    str(inputs), "--shots", "4", "--output", str(out), "--labels", "cat,bird"])
    assert bad.exit_code == 2 and "'dog' is not in --labels" in bad.stderr
    # the label set given, and an input without an answer: nothing to check on that input
    labelled = CliRunner().invoke(main, ["predict", "--model", str(tiny_model_dir), "--demos", str(demos), "--inputs",
                                         str(inputs), "--shots", "4", "--output", str(out), "--labels", "cat,dog"])
    assert labelled.exit_code == 0, labelled.output


@pytest.mark.slow
def test_eval_on_two_ranks_merges_the_same_records(tiny_model_dir, data_dir, tmp_path):
    """accelerate launch: cells dealt to 2 CPU ranks; rank 0 merges results.json = the one-process records."""
    from click.testing import CliRunner

    from manyicl.cli import main

    def config(out):
        cfg = tiny_config(tiny_model_dir, data_dir, out)
        cfg["tasks"].update(held_out=["sst2", "lama_P36"], forgetting=["rte"])
        cfg["evaluation"] = {"shots": [0, 2], "seeds": [0, 1], "max_queries": 3, "forgetting_shots": [1],
                             "max_tokens": 512}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    one = CliRunner().invoke(main, ["eval", str(config(tmp_path / "one"))])
    assert one.exit_code == 0, one.output
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "manyicl.cli", "eval",
         str(config(tmp_path / "two"))],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results:") == 1  # printed by rank 0 only

    def records(out):
        return [{k: v for k, v in r.items() if k != "seconds"}
                for r in json.loads((out / "results.json").read_text())]

    assert records(tmp_path / "two") == records(tmp_path / "one") and len(records(tmp_path / "one")) == 2 * (1 + 2) + 2
    assert not list((tmp_path / "two").glob("results.rank*.json"))
    for f in (tmp_path / "one" / "predictions" / "base").iterdir():
        assert (tmp_path / "two" / "predictions" / "base" / f.name).read_text() == f.read_text()
