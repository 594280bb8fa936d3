"""The in-context learning curve: one forward per sequence gives every answer's loss exactly, and the report's
statistics pair methods on the same sequences."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from manyicl.evaluation.curves import answer_losses, curve_sequences, run_curves
from manyicl.formatter import Formatter
from manyicl.reporting.curves import average_difference_at_last_k, difference_at_k, load_curve_table
from manyicl.task_files import load_task_dir


def test_answer_losses_equal_the_full_logits_loss_of_every_answer(llama_tokenizer, data_dir):
    task = load_task_dir(data_dir / "sst2")
    seq = curve_sequences(task, llama_tokenizer, Formatter.for_task(task), 512, 1)[0]
    assert seq.n_targets >= 5 and sum(ex.input in seq.text for ex in task.test) >= seq.n_targets  # the TEST split
    model = tiny_model(len(llama_tokenizer))
    nll, tokens = answer_losses(model, seq)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq.input_ids])).logits[0].float(), -1)
    naive = [-sum(float(logp[i - 1, seq.input_ids[i]]) for i in range(s, e)) for s, e in seq.target_spans]
    assert tokens == [e - s for s, e in seq.target_spans]
    assert nll == pytest.approx(naive, rel=1e-4)


def test_curves_are_paired_across_methods_and_reused(llama_tokenizer, data_dir, tmp_path):
    task = load_task_dir(data_dir / "sst2")
    models = {"base": tiny_model(len(llama_tokenizer), seed=0), "manyicl": tiny_model(len(llama_tokenizer), seed=1)}
    calls = []

    def measure(method):
        def load():
            calls.append(method)
            return models[method], llama_tokenizer
        return run_curves([(task, "held_out")], tmp_path, method, "tiny", None, 256, 3,
                          lambda t, tok: Formatter.for_task(t, tok), load)

    measure("base")
    records = measure("manyicl")
    assert calls == ["base", "manyicl"] and len(records) == 6
    measure("base")  # everything is there: the model is not even loaded
    assert calls == ["base", "manyicl"]
    by_seed = {}
    for r in json.loads((tmp_path / "curves.json").read_text()):
        by_seed.setdefault(r["seed"], set()).add(r["ids_sha256"])
    assert all(len(digests) == 1 for digests in by_seed.values())  # the same token ids for both methods
    curves = load_curve_table(tmp_path)
    a, b = curves["manyicl", "sst2"], curves["base", "sst2"]
    assert a.per_token.shape == b.per_token.shape == (3, a.last_k)
    d = difference_at_k(a, b, a.last_k)
    expected = float(np.mean(a.per_token[:, -1] - b.per_token[:, -1]))
    assert d.value == pytest.approx(expected) and d.low <= d.value <= d.high
    avg = average_difference_at_last_k(curves, "manyicl", "base", ["sst2"])
    assert avg.value == pytest.approx(expected)
