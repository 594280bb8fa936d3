"""The target-only loss equals transformers' full-logits loss, in value and in gradients."""

import pytest
import torch

from conftest import tiny_model
from manyicl.training.loss import full_logits_loss, target_only_loss
from manyicl.training.mixture import collate


def batch_of(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for n, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * length
        target = [-1] * length
        # three answers of different lengths at different places
        for k, (s, e) in enumerate([(5, 7), (12, 20), (length - 3, length)]):
            labels[s:e] = ids[s:e]
            target[s:e] = [k] * (e - s)
        items.append({"input_ids": ids, "labels": labels, "target_index": target, "position_ids": None,
                      "sequence_id": n, "task_id": 0})
    batch = collate(items, pad_id=0)
    batch.pop("sequence_id"), batch.pop("task_id")
    return batch


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_target_only_equals_full_logits(arch):
    model = tiny_model(500, arch).train()
    batch = batch_of(500, [40, 32])
    ours, stats = target_only_loss(model, batch)
    grads_ours = torch.autograd.grad(ours, [p for p in model.parameters()])
    ref = full_logits_loss(model, batch)
    grads_ref = torch.autograd.grad(ref, [p for p in model.parameters()])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert stats.answers == 6 and stats.target_tokens == 2 * (2 + 8 + 3)


def test_per_target_normalisation_weighs_answers_equally():
    model = tiny_model(500).eval()
    batch = batch_of(500, [40])
    with torch.no_grad():
        per_target, _ = target_only_loss(model, batch, "target")
        logits = model(input_ids=batch["input_ids"]).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        labels = batch["labels"][0]
        answer_means = []
        for s, e in [(5, 7), (12, 20), (37, 40)]:
            answer_means.append(torch.stack([-logp[p - 1, labels[p]] for p in range(s, e)]).mean())
        torch.testing.assert_close(per_target, torch.stack(answer_means).mean(), atol=1e-5, rtol=1e-5)
