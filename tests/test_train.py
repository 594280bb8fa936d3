"""Training: outputs, resume after SIGKILL (same weights and loss curve), distributed sharding, bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from manyicl.config import ExperimentConfig
from manyicl.errors import ManyICLError
from manyicl.training import train
from manyicl.training.checkpoints import config_hash

ROOT = Path(__file__).resolve().parents[1]


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_script(code, **env):
    """Run training in a child process (so it can be SIGKILLed) and return the completed process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out)))
    return out


def test_outputs(reference_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = reference_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["answers"] >= 1 and r["target_tokens"] >= r["answers"] and r["tokens"] > 0 for r in log)
    mixture = json.loads((out / "mixture.json").read_text())
    assert sum(m["sequences"] for m in mixture.values()) == 8 and set(mixture) == {"sst2", "rte", "gsm8k"}
    # each step names the tasks it trained on (batch 1: one); their counts are the mixture's
    assert all(len(r["tasks"]) == 1 for r in log)
    assert {t: sum(r["tasks"] == [t] for r in log) for t in mixture} == {t: m["sequences"] for t, m in mixture.items()}
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["max_steps"] == 8
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


KILL_AT_STEP = """
    import os, signal, yaml
    from transformers import TrainerCallback
    import manyicl.training.recipe as T
    from manyicl.config import ExperimentConfig

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:   # after checkpoint-4 is complete, in the middle of the run
                os.kill(os.getpid(), signal.SIGKILL)

    original = T.ManyICLTrainer.__init__
    def patched(self, *a, **k):
        original(self, *a, **k)
        self.add_callback(Kill())
    T.ManyICLTrainer.__init__ = patched
    T.train(ExperimentConfig.model_validate(yaml.safe_load(open(os.environ["CFG"]))))
"""

KILL_DURING_SAVE = """
    import os, signal, yaml
    from transformers import Trainer
    import manyicl.training.recipe as T
    from manyicl.config import ExperimentConfig

    original = Trainer._save_rng_state
    def dying(self, output_dir):
        if self.state.global_step == 6:  # the model is written, the rest of checkpoint-6 is not
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    Trainer._save_rng_state = dying
    T.train(ExperimentConfig.model_validate(yaml.safe_load(open(os.environ["CFG"]))))
"""


@pytest.mark.parametrize("script", [KILL_AT_STEP, KILL_DURING_SAVE],
                         ids=["kill-after-step-5", "kill-while-saving-step-6"])
def test_sigkill_then_resume_matches_uninterrupted(reference_run, tiny_model_dir, data_dir, tmp_path, script):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out))
    killed = run_script(script, CFG=str(cfg))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "adapter").exists()
    if script is KILL_DURING_SAVE:
        assert (out / "checkpoints" / "checkpoint-6").exists()
        assert not (out / "checkpoints" / "checkpoint-6" / "manyicl_complete.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "manyicl.cli", "train", str(cfg), "--resume"],
                             capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-5)
    mixture = lambda run: json.loads((run / "mixture.json").read_text())  # noqa: E731
    assert mixture(out) == mixture(reference_run)  # per-task counts survive the crash too
    ours, ref = adapter(out), adapter(reference_run)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_same_run_and_memory_released(reference_run, tiny_model_dir, data_dir, tmp_path):
    """Checkpointing changes memory, not the math; on CPU it also turns on release_freed_memory (memory.py)."""
    out = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, gradient_checkpointing=True))
    proc = subprocess.run([sys.executable, "-m", "manyicl.cli", "train", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "freed activations were returned to the OS" in proc.stdout
    assert json.loads((out / "train_summary.json").read_text())["released_freed_memory"] is True
    assert json.loads((reference_run / "train_summary.json").read_text())["released_freed_memory"] is False
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-5)
    ours, ref = adapter(out), adapter(reference_run)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5)
    # a memory/speed setting: a run may be resumed with it changed
    hash_of = lambda **t: config_hash(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, **t)))  # noqa: E731
    assert hash_of(release_freed_memory=False) == hash_of(release_freed_memory=True) != hash_of(learning_rate=0.1)


MMAPPED_AFTER_FREE = """
    import ctypes, sys, torch
    from manyicl.training.memory import release_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t)
                    for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "release":
        assert release_freed_memory()
    # allocating and freeing a 16 MB block raises glibc's dynamic mmap threshold
    torch.empty(16 << 20, dtype=torch.uint8)
    before = libc.mallinfo2().hblkhd
    block = torch.ones(4 << 20, dtype=torch.uint8)
    print(libc.mallinfo2().hblkhd - before >= 4 << 20)  # is the 4 MB block mmap-ed (returned to the OS on free)?
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator")
def test_release_freed_memory_mmaps_large_blocks():
    def mmapped(mode):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MMAPPED_AFTER_FREE), mode], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert mmapped("default") == "False"  # glibc keeps it in the heap, where freed memory stays with the process
    assert mmapped("release") == "True"


def test_distributed_two_ranks(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, max_steps=4, save_steps=100))
    proc = subprocess.run(
        # accelerate 1.x: "--cpu --num_processes 2" starts ONE process unless MPI is set up; the torchrun-based
        # launcher starts two, and manyicl puts them on CPU (gloo) when there is no GPU.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "manyicl.cli", "train",
         str(cfg)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / "shards" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights_sha256"] == r1["weights_sha256"]  # both ranks end with identical weights
    assert not set(r0["sequences"]) & set(r1["sequences"])  # sharded, not duplicated
    assert sorted(r0["sequences"] + r1["sequences"]) == list(range(8))  # 4 steps x 1 per device x 2 ranks
    assert sum(m["sequences"] for m in json.loads((out / "mixture.json").read_text()).values()) == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": {"meta_train": []}}, "the mixture is empty"),
        ({"tasks": {"meta_train": ["no_such_task"]}}, "no_such_task"),
        ({"training": {"max_tokens": 5000}}, "exceeds the model's context length"),
        ({"training": {"max_tokens": 8}}, "smaller than one example's answer"),
        ({"tasks": {"held_out": ["sst2"]}}, "'sst2' is in both meta_train and held_out"),
    ],
)
def test_bad_training_input(tiny_model_dir, data_dir, tmp_path, change, message):
    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "run")
    for section, values in change.items():
        cfg[section].update(values)
    with pytest.raises(ManyICLError, match=message):
        train(ExperimentConfig.model_validate(cfg))
    assert not (tmp_path / "run" / "adapter").exists()


def test_existing_run_and_bad_checkpoints(reference_run, tiny_model_dir, data_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    cfg = tiny_config(tiny_model_dir, data_dir, out)
    with pytest.raises(ManyICLError, match="already holds a run; use --resume"):
        train(ExperimentConfig.model_validate(cfg))
    other = {**cfg, "training": {**cfg["training"], "learning_rate": 1e-3}}
    with pytest.raises(ManyICLError, match="different config"):
        train(ExperimentConfig.model_validate(other), resume=True)
    (out / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ManyICLError, match="cannot resume from this checkpoint"):
        train(ExperimentConfig.model_validate(cfg), resume=True)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_refuses_a_checkpoint_of_another_model_under_the_same_name(llama_tokenizer, data_dir, tmp_path,
                                                                          finetune):
    """The config hash names the model, not its weights: a model replaced under the same path (a local folder
    rewritten, a Hub id updated) is refused in one line before training, from the shapes in the checkpoint."""
    from conftest import tiny_model

    model_dir = tmp_path / "model"

    def save_model(hidden):
        tiny_model(len(llama_tokenizer), hidden=hidden).save_pretrained(model_dir)
        llama_tokenizer.save_pretrained(model_dir)

    save_model(64)
    out = tmp_path / "run"
    cfg = ExperimentConfig.model_validate(tiny_config(model_dir, data_dir, out, max_steps=3, save_steps=3,
                                                      finetune=finetune, precision="fp32"))
    train(cfg)
    (out / "train_summary.json").unlink()  # as if it had stopped after its checkpoint
    save_model(32)
    with pytest.raises(ManyICLError, match=r"checkpoint-3: cannot resume from this checkpoint, it does not match this "
                                           r"model \(\S+ is \[[0-9, ]+\] there, \[[0-9, ]+\] here\); resume with the "
                                           r"model it was trained from, or use --overwrite$"):
        train(cfg, resume=True)


def test_resume_before_the_first_checkpoint_starts_again(reference_run, tiny_model_dir, data_dir, tmp_path):
    """A run stopped before it saved anything (config.yaml, a few logged steps, no checkpoint) has nothing to lose:
    resuming starts it again and gives the uninterrupted run; a different config in that folder is still refused."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    log = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(log[:3]) + "\n")
    cfg = tiny_config(tiny_model_dir, data_dir, out)
    other = {**cfg, "training": {**cfg["training"], "learning_rate": 1e-3}}
    with pytest.raises(ManyICLError, match="no complete checkpoint to resume from; use --overwrite"):
        train(ExperimentConfig.model_validate(other), resume=True)
    with pytest.warns(UserWarning, match="stopped before its first checkpoint; starting it again from step 0"):
        train(ExperimentConfig.model_validate(cfg), resume=True)
    assert losses(out) == pytest.approx(losses(reference_run))
    for name, weight in adapter(reference_run).items():
        torch.testing.assert_close(adapter(out)[name], weight)


def test_a_run_too_short_for_every_mixture_task_names_the_tasks_left_out(tiny_model_dir, data_dir, tmp_path):
    """Two sequences cannot give three tasks one each: the user is told which task gets none, before training."""
    out = tmp_path / "run"
    cfg = ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2, save_steps=2))
    with pytest.warns(UserWarning, match=r"training.max_steps: the run has 2 sequences, too few for the 3 mixture "
                                         r"tasks, so none for \w+; raise training.max_steps"):
        train(cfg)
    mixture = json.loads((out / "mixture.json").read_text())
    assert sorted(m["sequences"] for m in mixture.values()) == [0, 1, 1]


def test_every_mixture_task_gets_its_quota(tiny_model_dir, data_dir, tmp_path):
    """Three steps over three tasks: one sequence each, whatever the weights (mixture.json has quota and count)."""
    out = tmp_path / "run"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=3, save_steps=3)))
    mixture = json.loads((out / "mixture.json").read_text())
    assert [(m["quota"], m["sequences"]) for m in mixture.values()] == [(1, 1)] * 3



def test_mixture_quotas_round_by_largest_remainder_with_one_each():
    from manyicl.training.mixture import mixture_quotas

    assert mixture_quotas({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}  # 3.5, 2.1, 1.4
    assert mixture_quotas({"a": 0.98, "b": 0.01, "c": 0.01}, 10) == {"a": 8, "b": 1, "c": 1}  # the minimum of one
    counts = mixture_quotas({f"t{i}": w for i, w in enumerate([0.4, 0.3, 0.2, 0.06, 0.04])}, 100)
    assert counts == {"t0": 40, "t1": 30, "t2": 20, "t3": 6, "t4": 4}
