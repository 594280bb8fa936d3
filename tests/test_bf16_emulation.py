"""bf16 on a CPU without AVX-512 BF16 or AMX (precision.EmulatedBf16Kernels): the roundings of the bf16
instructions on fp32 kernels, in the forward and the backward, and a training in bf16 on such a CPU."""

import json

import torch
import torch.nn.functional as F

from conftest import tiny_config
from manyicl.config import ExperimentConfig
from manyicl.files import read_log
from manyicl.training import precision, train
from manyicl.training.precision import EmulatedBf16Kernels, bf16_kernels

aten = torch.ops.aten


def rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()  # what autocast hands a bf16 matmul


def test_emulated_linear_rounds_as_the_bf16_instructions_do_forward_and_backward():
    """inputs rounded to bf16, exact products summed in fp32, the result rounded to bf16: bit for bit, and the
    backward's matmuls too (a dispatch mode sits below autograd)."""
    torch.manual_seed(0)
    x = torch.randn(7, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    g = torch.randn(7, 32)
    with EmulatedBf16Kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w)
    y.backward(g)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), rounded(rounded(x) @ rounded(w).T))
    # autograd hands the bf16 gradient to mm, computed (and rounded) in bf16 before autocast's cast back to fp32
    assert torch.equal(x.grad, rounded(rounded(g) @ rounded(w)))
    assert torch.equal(w.grad, rounded(rounded(g).T @ rounded(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.linear(x, w)
    # torch's own bf16 kernel: the same up to the order of its fp32 sums, which can move the last bf16 bit
    assert torch.allclose(native.float(), y.float(), rtol=2 ** -7, atol=0)


def test_only_bf16_cpu_matmuls_are_rerouted():
    seen = []

    class Recording(EmulatedBf16Kernels):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
            return super().__torch_dispatch__(func, types, args, kwargs)

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with Recording():
        fp32 = a @ b  # fp32 in, fp32 out: untouched
        bf16 = a.bfloat16() @ b.bfloat16()
    assert fp32.dtype == torch.float32 and torch.equal(fp32, a @ b)
    assert bf16.dtype == torch.bfloat16 and any(f is aten.mm.default and torch.bfloat16 in d for f, d in seen)
    # the backward's matmuls pass through the mode too (it sits below autograd)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    with Recording(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w)
        seen.clear()
        y.float().sum().backward()
    assert sum(f is aten.mm.default and torch.bfloat16 in d for f, d in seen) == 2  # grad of x, grad of w


def test_emulated_attention_keeps_logsumexp_fp32_and_matches_native_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 16, requires_grad=True) for _ in range(3))

    def attention(mode):
        for t in (q, k, v):
            t.grad = None
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().pow(2).sum().backward()
        return out.float(), [t.grad.clone() for t in (q, k, v)]

    from contextlib import nullcontext

    emulated, emulated_grads = attention(EmulatedBf16Kernels())
    native, native_grads = attention(nullcontext())
    assert torch.allclose(emulated, native, atol=2e-2)  # bf16 outputs, softmax weights kept fp32 here
    for e, n in zip(emulated_grads, native_grads):
        assert torch.allclose(e, n, atol=5e-2 * n.abs().max().item())
    with EmulatedBf16Kernels():
        out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu(
            q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), is_causal=True)[:2]
    assert out.dtype == torch.bfloat16 and logsumexp.dtype == torch.float32


def test_bf16_training_on_a_cpu_without_bf16_instructions(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """precision bf16 trains (emulated) where the CPU lacks the instructions, says so per step and in the summary,
    and follows the native bf16 kernels' losses."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    losses = {}
    for fast in (True, False):  # torch's bf16 kernels (slow on a CPU without the instructions, but they run)
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert bf16_kernels("bf16") == ("native" if fast else "emulated") and bf16_kernels("fp32") is None
        out = tmp_path / ("native" if fast else "emulated")
        result = train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=3,
                                                                   precision="bf16")))
        rows = read_log(out / "train_log.jsonl")
        summary = json.loads((out / "train_summary.json").read_text())
        assert result.precision == "bf16" and summary["precision"] == "bf16"
        assert summary["bf16_steps"] == ({"native": 3, "emulated": 0} if fast else {"native": 0, "emulated": 3})
        assert [r.get("bf16_kernels") for r in rows] == [None if fast else "emulated"] * 3
        losses[fast] = [r["loss"] for r in rows]
    for native, emulated in zip(losses[True], losses[False]):  # other kernels, the same roundings
        assert abs(native - emulated) < 1e-2 * abs(native)
