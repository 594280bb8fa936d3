"""Training at scale: a gradient independent of batch layout, bf16 autocast, packed units without a dense mask,
allocator settings for the training phase only, Trainer loggers, and the shipped multi-rank config."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import tiny_config, tiny_model
from manyicl import train as train_module
from manyicl.config import ExperimentConfig
from manyicl.data import collate
from manyicl.errors import ManyICLError
from manyicl.formatter import Formatter
from manyicl.loss import supervised_count, target_only_loss
from manyicl.packing import isolating_mask, packed_attention, packed_isolation, unit_bounds
from manyicl.sequences import SequenceBuilder
from manyicl.tasks import load_task_dir
from manyicl.train import train

ROOT = Path(__file__).resolve().parents[1]


class GradientsAtFirstStep(TrainerCallback):
    """Saves the trainable parameters' gradients just before the first optimizer step (after the all-reduce)."""

    def __init__(self, path):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and state.is_world_process_zero:
            torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, self.path)


def layout_config(model_dir, data_dir, out, normalization, batch_size, grad_accum):
    # one optimizer step over the same 4 sequences; fp32, no dropout, no clipping: only the layout differs
    return tiny_config(model_dir, data_dir, out, max_steps=1, save_steps=100, precision="fp32", batch_size=batch_size,
                       grad_accum=grad_accum, loss_normalization=normalization, max_grad_norm=1e9,
                       lora={"r": 4, "alpha": 8, "dropout": 0.0})


TWO_RANKS = """
    import sys, torch, yaml
    sys.path.insert(0, {tests!r})
    from test_train_scale import GradientsAtFirstStep
    from manyicl.config import ExperimentConfig
    from manyicl.train import train
    for path, grads in zip(sys.argv[1::2], sys.argv[2::2]):
        train(ExperimentConfig.model_validate(yaml.safe_load(open(path))), callbacks=[GradientsAtFirstStep(grads)])
"""


def relative_difference(a: dict, b: dict) -> float:
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return diff / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


def test_gradient_does_not_depend_on_batch_layout(tiny_model_dir, data_dir, tmp_path):
    """Batch 4 x accumulation 1, batch 1 x accumulation 4 and 2 ranks x batch 2 give the same gradient, in token
    and in target normalisation (the ranks launched with the shipped FSDP config: on CPU ranks accelerate runs it
    as DDP over gloo, see docs/TRAINING.md)."""
    grads, ranks_args = {}, []
    for norm in ("token", "target"):
        for layout, (batch, accum) in {"4x1": (4, 1), "1x4": (1, 4)}.items():
            out = tmp_path / f"{norm}-{layout}"
            train(ExperimentConfig.model_validate(layout_config(tiny_model_dir, data_dir, out, norm, batch, accum)),
                  callbacks=[GradientsAtFirstStep(tmp_path / f"{norm}-{layout}.pt")])
            grads[norm, layout] = torch.load(tmp_path / f"{norm}-{layout}.pt")
        config = tmp_path / f"{norm}-2ranks.yaml"
        config.write_text(yaml.safe_dump(layout_config(tiny_model_dir, data_dir, tmp_path / f"{norm}-2ranks",
                                                       norm, 2, 1)))
        ranks_args += [str(config), str(tmp_path / f"{norm}-2ranks.pt")]
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS.format(tests=str(ROOT / "tests"))))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", str(script), *ranks_args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for norm in ("token", "target"):
        grads[norm, "2ranks"] = torch.load(tmp_path / f"{norm}-2ranks.pt")
        reference = grads[norm, "4x1"]
        # (B = 0 at init: A's grad is 0)
        assert all(float(g.abs().max()) > 0 for n, g in reference.items() if "lora_B" in n)
        logged = {layout: json.loads((tmp_path / f"{norm}-{layout}" / "train_log.jsonl").read_text().splitlines()[0])
                  for layout in ("4x1", "1x4", "2ranks")}
        for layout in ("1x4", "2ranks"):
            assert relative_difference(grads[norm, layout], reference) < 1e-5, (norm, layout)
            # the logged loss is the step's loss too, and the counts are the whole step's
            assert logged[layout]["loss"] == pytest.approx(logged["4x1"]["loss"], rel=1e-5), (norm, layout)
            assert logged[layout]["target_tokens"] == logged["4x1"]["target_tokens"]
    # the two normalisations are different gradients (one weighs tokens, the other answers)
    assert relative_difference(grads["target", "4x1"], grads["token", "4x1"]) > 1e-3


def test_all_masked_micro_batch_contributes_zero(llama_tokenizer):
    model = tiny_model(len(llama_tokenizer)).train()
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[0] = -100  # row 0: nothing supervised
    labels[1, :8] = -100
    target_index = torch.full_like(ids, -1)
    target_index[1, 8:] = 0
    batch = {"input_ids": ids, "labels": labels, "target_index": target_index}
    for norm in ("token", "target"):
        masked = {k: v[:1] for k, v in batch.items()}
        assert supervised_count(masked, norm) == 0
        loss, _ = target_only_loss(model, masked, norm, num_items=torch.tensor(5))
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        whole, _ = target_only_loss(model, batch, norm, num_items=torch.tensor(0))  # a whole step with nothing: no NaN
        assert torch.isfinite(whole)
        model.zero_grad()
        # the masked row adds nothing: the batch's summed loss is the supervised row's
        alone, _ = target_only_loss(model, {k: v[1:] for k, v in batch.items()}, norm, num_items=torch.tensor(7))
        both, _ = target_only_loss(model, batch, norm, num_items=torch.tensor(7))
        torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)


class Bf16Probe(TrainerCallback):
    """Records the dtype a LoRA-adapted projection computes in, and the dtypes of what trains."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
        def record(module, inputs, output):
            self.seen.setdefault("matmul", output.dtype)

        def record_sum(module, inputs, output):
            self.seen.setdefault("lora_sum", output.dtype)

        layer.register_forward_hook(record, prepend=True)  # before the hook that widens the output for the sum
        next(m for n, m in model.named_modules() if n.endswith("q_proj")).register_forward_hook(record_sum)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
        self.seen["optimizer_state"] = {t.dtype for s in optimizer.state.values() for t in s.values()
                                        if torch.is_tensor(t) and t.dim()}


def test_bf16_autocast_keeps_trainable_weights_fp32(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from manyicl import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # autocast runs on any CPU, only slower
    probe = Bf16Probe()
    out = tmp_path / "bf16"
    result = train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2,
                                                               precision="bf16")),
                   callbacks=[probe])
    assert result.precision == "bf16" and json.loads((out / "train_summary.json").read_text())["precision"] == "bf16"
    assert probe.seen["matmul"] == torch.bfloat16 and probe.seen["lora_sum"] == torch.float32
    assert probe.seen["trainable"] == {torch.float32} and probe.seen["optimizer_state"] == {torch.float32}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    fp32 = train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, tmp_path / "fp32", max_steps=2,
                                                             precision="fp32")))
    assert fp32.precision == "fp32"


def test_bf16_lora_update_below_rounding_step_reaches_the_output():
    """PEFT adds the LoRA update to the bf16 output and keeps bf16: an update of 1e-4 of the output vanishes.
    keep_lora_sums_fp32 adds it in fp32, so the forward sees it (and still multiplies in bf16)."""
    from peft import LoraConfig, get_peft_model

    from manyicl.precision import keep_lora_sums_fp32

    torch.manual_seed(0)
    x = torch.randn(4, 64)

    def update_seen(widen: bool) -> float:
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoraConfig(r=4, target_modules=["0"]))
        layer = model.base_model.model[0]
        with torch.no_grad():
            base = layer.base_layer(x)
            layer.lora_B["default"].weight.fill_(1e-4 * base.abs().mean().item()
                                                 / (layer.lora_A["default"](x).abs().mean().item()
                                                    * layer.scaling["default"]))
        if widen:
            assert keep_lora_sums_fp32(model) == 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float()
            with model.disable_adapter():
                frozen = model(x).float()
        with torch.no_grad():
            wanted = (layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]).float()
        return float(((out - frozen) - wanted).abs().mean() / wanted.abs().mean())

    assert update_seen(widen=False) > 0.5  # most of the update is lost in the bf16 sum
    assert update_seen(widen=True) < 0.05  # kept (what is left: the update itself computed in bf16)


def test_precision_auto_and_bf16_requests(monkeypatch):
    from manyicl import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "bf16"  # CPU with AVX-512 BF16 / AMX: autocast
    assert precision.resolve_precision("bf16") == "bf16"
    assert precision.resolve_precision("fp32") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"  # a CPU where bf16 would be slower
    assert precision.resolve_precision("bf16") == "bf16"  # asked for: emulated (test_bf16_emulation.py)
    assert precision.bf16_kernels("bf16") == "emulated"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto") == "bf16"  # CUDA with bf16: autocast
    assert precision.resolve_precision("fp32", torch.bfloat16) == "bf16"  # weights already bf16


def test_auto_on_a_cpu_with_bf16_is_measured_cached_and_recorded(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """auto on a CPU with AVX-512 BF16 / AMX: both precisions timed on the loaded model, bf16 only where it takes
    at most 90 % of fp32's time; measured once per CPU and shape (cached), printed, and in train_summary.json."""
    from manyicl import precision

    monkeypatch.setenv("MANYICL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    timings = {False: 1.0, True: 0.95}  # fp32, bf16 seconds: bf16 is faster, but not by the margin
    monkeypatch.setattr(precision, "_timed_pass", lambda model, ids, bf16: timings[bf16])
    model = tiny_model(100)
    first = precision.measure_cpu_precision(model, 4096)
    assert (first.choice, first.tokens, first.cached) == ("fp32", precision.PROBE_TOKENS, False)
    timings[True] = 0.5
    again = precision.measure_cpu_precision(model, 4096)
    assert again.cached and again.choice == "fp32" and again.bf16_seconds == 0.95  # cached: not measured again
    assert precision.measure_cpu_precision(model, 256).choice == "bf16"  # another shape: measured
    out = tmp_path / "run"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=3, save_steps=3)))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["precision"] == summary["precision_probe"]["choice"] == "bf16"
    assert summary["precision_probe"]["fp32_seconds"] == 1.0 and summary["precision_probe"]["tokens"] == 256


def test_resume_refuses_another_precision(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """auto may resolve differently on another machine: a run resumes in the precision its checkpoints were made in."""
    from manyicl import precision
    from manyicl.checkpoints import CHECKPOINT_MARKER
    from manyicl.errors import ManyICLError

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "run"
    cfg = ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2, save_steps=1))
    train(cfg)
    (out / "train_summary.json").unlink()  # as if it had stopped after its checkpoints
    assert json.loads((out / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER).read_text())["precision"] == "fp32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # auto is now measured ...
    monkeypatch.setattr(train_module, "measure_cpu_precision",  # ... and comes out bf16
                        lambda model, tokens: precision.PrecisionProbe("bf16", 1.0, 0.5, 256, "a test CPU"))
    with pytest.raises(ManyICLError, match="checkpoint-2: trained in fp32, but this run resolves training.precision to "
                                           "bf16; set training.precision: fp32 to resume it"):
        train(cfg, resume=True)
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2, save_steps=1,
                                                      precision="fp32")), resume=True)  # what the message says works


def _packed_rows(tokenizer, task, objective):
    builder = SequenceBuilder(task, tokenizer, Formatter.for_task(task), 512, objective, n_shots=2)
    rows = [builder.build_packed(seed) for seed in (1, 2)]
    item = lambda s: {"input_ids": s.input_ids, "labels": s.labels, "target_index": s.target_index(),  # noqa: E731
                      "position_ids": s.position_ids, "sequence_id": 0, "task_id": 0}
    packed = collate([item(s) for s in rows], tokenizer.pad_token_id)
    assert packed["position_ids"].eq(0).sum() >= 5  # several units per row
    return rows, packed


def _each_unit_alone(model, rows, normalization):
    alone = 0.0
    with torch.no_grad():
        for seq in rows:
            starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [seq.n_tokens]
            for s, e in zip(starts, starts[1:]):
                unit = {"input_ids": torch.tensor([seq.input_ids[s:e]]), "labels": torch.tensor([seq.labels[s:e]]),
                        "target_index": torch.tensor([seq.target_index()[s:e]])}
                unit["target_index"][unit["target_index"] >= 0] = 0  # one answer per unit
                alone += float(target_only_loss(model, unit, normalization, num_items=1)[0])
    return alone


# (architecture, attention implementation, extra config, how the units are kept apart)
ISOLATION_CASES = [
    ("llama", "sdpa", {}, "per_unit"),
    ("llama", "eager", {}, "mask"),
    ("mistral", "sdpa", {"sliding_window": 16}, "mask"),  # a window narrower than the units: the mask carries it
    ("mistral", "eager", {"sliding_window": 16}, "mask"),
]


@pytest.mark.parametrize("arch, attention, extra, isolation", ISOLATION_CASES)
@pytest.mark.parametrize("objective", ["zero_shot", "few_shot"])
@pytest.mark.parametrize("normalization", ["token", "target"])
def test_packed_units_equal_each_unit_alone(llama_tokenizer, data_dir, objective, normalization, arch, attention, extra,
                                            isolation):
    """Packed rows, isolated as the trainer isolates them (per-unit attention, or the explicit block-diagonal mask
    with the model's window): the same loss as running every unit alone through the model's own masks."""
    task = load_task_dir(data_dir / "sst2")
    rows, packed = _packed_rows(llama_tokenizer, task, objective)
    model = tiny_model(len(llama_tokenizer), arch=arch, attention=attention, **extra)
    assert packed_isolation(model, 512) == isolation
    if arch == "mistral":
        assert max(e - s for s, e in unit_bounds(packed["position_ids"][0])) > 16  # the window matters in a unit
    with torch.no_grad(), packed_attention(model, 512) as per_unit:
        assert per_unit == (isolation == "per_unit")
        if not per_unit:
            packed["attention_mask"] = isolating_mask(model, packed["position_ids"], 512)
        loss, _ = target_only_loss(model, packed, normalization, num_items=1)
    assert model.config._attn_implementation == attention  # restored after the block
    assert float(loss) == pytest.approx(_each_unit_alone(model, rows, normalization), rel=1e-5)


def test_a_causal_mask_alone_lets_packed_units_see_each_other(llama_tokenizer, data_dir):
    """The check above can fail: a plain causal mask over the packed row (no isolation) gives another loss."""
    task = load_task_dir(data_dir / "sst2")
    rows, packed = _packed_rows(llama_tokenizer, task, "zero_shot")
    model = tiny_model(len(llama_tokenizer), attention="eager")
    width = packed["input_ids"].shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()[None, None].expand(len(rows), 1, width, width)
    packed["attention_mask"] = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    with torch.no_grad():
        loss, _ = target_only_loss(model, packed, "token", num_items=1)
    # far outside the tolerance the check above uses (a random-init model attends almost uniformly: the gap is small)
    assert float(loss) != pytest.approx(_each_unit_alone(model, rows, "token"), rel=1e-4)


def test_packing_refuses_models_it_cannot_isolate(llama_tokenizer):
    """Layers of several kinds with a window narrower than the row, or another attention implementation: one line."""
    mixed = tiny_model(len(llama_tokenizer), arch="qwen2", sliding_window=16, use_sliding_window=True,
                       max_window_layers=1)
    with pytest.raises(ManyICLError, match=r"^training.pack: this model's layers attend in several ways"):
        packed_isolation(mixed, 512)
    assert packed_isolation(mixed, 16) == "mask"  # a row no longer than the window: every layer attends alike
    other = tiny_model(len(llama_tokenizer))
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ManyICLError, match=r"^training.pack: packed units are isolated only with sdpa or eager"):
        packed_isolation(other, 512)


ALLOCATOR_IN_COMPARE = """
    import ctypes, json, sys, torch, yaml
    import manyicl.compare as C
    from manyicl.config import ExperimentConfig

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t)
                    for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped():  # is a freed 8 MB block's successor mmap-ed (returned to the OS) or kept in the heap?
        torch.empty(40 << 20, dtype=torch.uint8)
        before = libc.mallinfo2().hblkhd
        block = torch.ones(8 << 20, dtype=torch.uint8)
        return libc.mallinfo2().hblkhd - before >= 8 << 20

    seen = []
    original = C.run_evaluation
    def probed(*args, **kwargs):
        seen.append(mmapped())
        return original(*args, **kwargs)
    C.run_evaluation = probed
    C.compare(ExperimentConfig.model_validate(yaml.safe_load(open(sys.argv[1]))), ["manyicl"])
    print(json.dumps(seen))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator")
def test_compare_releases_freed_memory_while_training_only(tiny_model_dir, tmp_path):
    config = {
        "model": {"name": str(tiny_model_dir)},
        "tasks": {"meta_train": [{"name": "sym_topic", "synthetic": True}],
                  "held_out": [{"name": "key_lookup", "synthetic": True}]},
        "training": {"max_tokens": 128, "max_steps": 1, "gradient_checkpointing": True, "lora": {"r": 4, "alpha": 8}},
        "evaluation": {"shots": [0], "seeds": [0], "max_queries": 4},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(ALLOCATOR_IN_COMPARE), str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False]  # evaluation: large blocks kept in the heap
    assert json.loads((tmp_path / "run/train/manyicl/train_summary.json").read_text())["released_freed_memory"] is True


def test_report_to_tensorboard_writes_event_files(tiny_model_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2,
                                                      report_to="tensorboard")))
    events = list((out / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
