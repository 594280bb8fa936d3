"""Faults users meet, one test per class, with real processes where processes are the point: a run folder used by
two processes, a full / read-only disk and other refusals of the system, broken adapters and output paths, labels
outside the declared set, arguments checked before any model work, SIGINT / SIGTERM during training. Each asserts
the exit status, a one-line message naming the culprit, and that nothing partial is left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_config, write_task
from manyicl.cli import main
from manyicl.config import ExperimentConfig
from manyicl.files import os_error_message
from manyicl.runlock import LOCK_NAME
from manyicl.training import train

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = """
import sys, time
from manyicl.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def manyicl(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "manyicl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "manyicl.cli", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def error_line(stderr: str) -> str:
    """The one line a failure ends with (warnings before it are the libraries')."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def holder(tmp_path):
    """A second process holding a folder's lock, as a running train/eval/compare would."""
    processes = []

    def hold(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
        assert p.stdout.readline().strip() == "held"
        processes.append(p)
        return p

    yield hold
    for p in processes:
        p.kill()
        p.wait()


def wait_for_steps(log: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{log}: fewer than {n} steps after {timeout} s")


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- one process per run folder


LONG_RUN = {"max_steps": 400, "save_steps": 1000, "max_tokens": 128, "precision": "fp32"}


def test_a_second_train_on_the_same_folder_refuses_naming_the_first(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, **LONG_RUN))
    first = start("train", cfg)
    try:
        wait_for_steps(out / "train_log.jsonl", 1, first)
        second = manyicl("train", cfg, "--overwrite")
        line = error_line(second.stderr)
        assert second.returncode == 2 and f"in use by pid {first.pid}" in line and "manyicl" in line and "train" in line
        assert str(out) in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait()
    assert first.returncode == 128 + signal.SIGTERM
    assert not (out / LOCK_NAME).exists()  # released on the way out


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_second_eval_or_compare_on_the_same_folder_refuses(tiny_model_dir, data_dir, tmp_path, command):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, data_dir, out, precision="fp32")
    cfg["evaluation"] = {"shots": [0, 8, 16], "max_queries": 1000, "seeds": [0, 1, 2]}  # long enough to overlap
    cfg["compare"] = {"methods": ["manyicl", "base"]}
    path = write_config(tmp_path / "c.yaml", cfg)
    first = start(command, path)
    try:
        deadline = time.time() + 60
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        second = manyicl(command, path)
        line = error_line(second.stderr)
        assert second.returncode == 2 and f"in use by pid {first.pid}" in line and str(out) in line
        assert f"manyicl {command}" in line
        written = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert set(before) <= set(written)  # the refused process removed nothing (the first one goes on writing)
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in error_line(stderr)
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tiny_model_dir, data_dir, tmp_path, holder):
    out = tmp_path / "run"
    held = holder(out)
    held.kill()
    held.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == held.pid  # the dead process's details stay
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, max_steps=2, precision="fp32"))
    result = manyicl("train", cfg)
    assert result.returncode == 0, result.stderr[-2000:]
    notices = [line for line in result.stderr.splitlines() if "taking over the lock" in line]
    assert len(notices) == 1 and f"pid {held.pid}" in notices[0]
    assert (out / "adapter").exists() and not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- SIGINT / SIGTERM during training


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_at_a_checkpoint_and_resume_matches(tiny_model_dir, data_dir, tmp_path, signum):
    settings = {**LONG_RUN, "max_steps": 200}
    reference = tmp_path / "reference"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, reference, **settings)))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, **settings))
    process = start("train", cfg)
    wait_for_steps(out / "train_log.jsonl", 20, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    line = error_line(stderr)
    assert f"stopped by {signal.Signals(signum).name} at step" in line and "--resume" in line
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "manyicl_complete.json").exists()  # complete, or none
    step = int(checkpoints[0].name.split("-")[1])
    assert 20 <= step < 200 and f"at step {step}" in line
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()
    resumed = manyicl("train", cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)


# ---------------------------------------------------------------- the operating system says no


@pytest.fixture
def tmpfs(tmp_path):
    """A small file system of its own (tmpfs, mounted as root), to fill up or make read-only."""
    mounted = []

    def make(size_kb: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): the full-disk and "
                        "read-only cases need one")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill ``folder``'s file system, leaving ``leave`` bytes."""
    stats = os.statvfs(folder)
    with open(folder / f"filler{len(list(folder.glob('filler*')))}", "wb") as f:
        f.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


def test_training_onto_a_full_disk(tiny_model_dir, data_dir, tmp_path, tmpfs):
    disk = tmpfs(96)  # the config and the log fit, the first checkpoint does not
    out = disk / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, out, precision="fp32"))
    result = manyicl("train", cfg)
    line = error_line(result.stderr)
    assert result.returncode == 1 and "No space left on device" in line and str(out) in line and "free" in line
    assert not list((out / "checkpoints").glob("checkpoint-*"))  # no partial checkpoint left, none marked complete
    assert not (out / "adapter").exists() and not (out / LOCK_NAME).exists()


def test_evaluating_and_predicting_onto_a_full_disk(tiny_model_dir, data_dir, tmp_path, tmpfs):
    disk = tmpfs(64)
    cfg = tiny_config(tiny_model_dir, data_dir, disk / "eval")
    cfg["evaluation"] = {"shots": [0], "max_queries": 2, "seeds": [0]}
    path = write_config(tmp_path / "c.yaml", cfg)
    fill(disk, leave=4096)  # the lock's page, and no more
    result = manyicl("eval", path)
    line = error_line(result.stderr)
    assert result.returncode == 1 and "No space left on device" in line and str(disk / "eval") in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler0"]  # no results.json, no prediction, no lock
    demos = write_task(tmp_path / "d", [{"input": "good", "output": "positive"},
                                        {"input": "bad", "output": "negative"}])
    fill(disk)
    result = manyicl("predict", "--model", tiny_model_dir, "--demos", demos / "train.jsonl", "--inputs",
                     demos / "train.jsonl", "--output", disk / "out.jsonl")
    line = error_line(result.stderr)
    assert result.returncode == 1 and str(disk / "out.jsonl") in line and "No space left on device" in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler0", "filler1"]


def test_training_onto_a_read_only_disk(tiny_model_dir, data_dir, tmp_path, tmpfs):
    disk = tmpfs(1024)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, disk / "run"))
    result = manyicl("train", cfg)
    line = error_line(result.stderr)
    assert result.returncode == 1 and "Read-only file system" in line and str(disk / "run") in line


def test_an_output_folder_under_a_file(tiny_model_dir, data_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, tmp_path / "afile" / "run"))
    result = manyicl("train", cfg)
    line = error_line(result.stderr)
    assert result.returncode == 1 and str(tmp_path / "afile") in line and "not a folder" in line


def test_no_permission_is_one_line(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    # as root the system never refuses a permission: the refusal is injected where the run folder is made
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_model_dir, data_dir, tmp_path / "run"))
    result = CliRunner().invoke(main, ["train", str(cfg)])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: Permission denied; no permission to write there; choose a folder you own or fix "
        "its permissions"]


@pytest.mark.parametrize("code", sorted(errno.errorcode))
def test_every_os_error_is_one_line(code):
    message = os_error_message(OSError(code, os.strerror(code), "/some/path"))
    assert message.startswith("/some/path: ") and "\n" not in message and "; " in message


def test_predict_output_paths(tiny_model_dir, tmp_path):
    demos = write_task(tmp_path / "d", [{"input": "good", "output": "positive"},
                                        {"input": "bad", "output": "negative"}])
    args = ["predict", "--model", "no-such-model/anywhere/at-all", "--demos", demos / "train.jsonl", "--inputs",
            demos / "train.jsonl", "--output"]
    # a folder as --output: refused before the (missing) model is looked at
    result = manyicl(*args, tmp_path)
    assert (result.returncode == 2
            and error_line(result.stderr) == f"error: --output {tmp_path}: is a folder; name a file in it")
    (tmp_path / "afile").write_text("x")
    result = manyicl(*args, tmp_path / "afile" / "out.jsonl")
    assert result.returncode == 2 and "is a file, not a folder" in error_line(result.stderr)
    # into a folder that does not exist yet: made
    args[2] = str(tiny_model_dir)
    result = manyicl(*args, tmp_path / "new" / "deeper" / "out.jsonl")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "new" / "deeper" / "out.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------- adapters


def broken_adapters(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    cases = {}
    missing = root / "no-config"
    shutil.copytree(good, missing)
    (missing / "adapter_config.json").unlink()
    cases["no config"] = (missing, f"{missing / 'adapter_config.json'}: missing")
    garbled = root / "garbled"
    shutil.copytree(good, garbled)
    (garbled / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    cases["config not JSON"] = (garbled, f"{garbled / 'adapter_config.json'}: not valid JSON")
    weightless = root / "no-weights"
    shutil.copytree(good, weightless)
    (weightless / "adapter_model.safetensors").unlink()
    cases["no weights"] = (weightless, f"{weightless}: no adapter weights")
    cut = root / "cut-off"
    shutil.copytree(good, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["weights cut off"] = (cut, f"{weights}: cannot be loaded")
    return cases


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "run"
    train(ExperimentConfig.model_validate(tiny_config(tiny_model_dir, data_dir, out, max_steps=2)))
    return out / "adapter"


def test_broken_adapters(tiny_model_dir, data_dir, tmp_path, trained_adapter):
    demos = write_task(tmp_path / "d", [{"input": "good", "output": "positive"},
                                        {"input": "bad", "output": "negative"}])
    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "eval")
    cfg["evaluation"] = {"shots": [0], "max_queries": 2, "seeds": [0]}
    path = write_config(tmp_path / "c.yaml", cfg)
    for name, (adapter, message) in broken_adapters(tmp_path, trained_adapter).items():
        # the base model named is missing: a message about the adapter shows it was checked first
        model = tiny_model_dir if name == "weights cut off" else "no-such-model/anywhere/at-all"
        result = manyicl("predict", "--model", model, "--adapter", adapter, "--demos", demos / "train.jsonl",
                         "--inputs", demos / "train.jsonl", "--output", tmp_path / "p.jsonl")
        assert result.returncode == 2 and message in error_line(result.stderr), name
        assert not (tmp_path / "p.jsonl").exists()
        if name != "weights cut off":
            result = manyicl("eval", path, "--adapter", adapter, "--set", "model.name=no-such-model/anywhere/at-all")
            assert result.returncode == 2 and message in error_line(result.stderr), name
            assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------- labels, arguments, the first run


@pytest.mark.parametrize("split, family, labels, bad", [
    ("train", "classification", ["positive", "negative"], "neutral"),
    ("test", "classification", ["positive", "negative"], "neutral"),
    ("train", "multilabel", ["joy", "anger"], "joy, rage"),
])
def test_an_answer_outside_the_declared_labels(tmp_path, split, family, labels, bad):
    good = [{"input": f"text {i}", "output": labels[i % 2]} for i in range(4)]
    wrong = good[:2] + [{"input": "odd one", "output": bad}] + good[2:]
    task = write_task(tmp_path / "t", wrong if split == "train" else good, wrong if split == "test" else good,
                      yaml.safe_dump({"family": family, "labels": labels}))
    empty_cache = tmp_path / "cache"
    result = manyicl("show-sequence", "--data", task, env={"MANYICL_CACHE": str(empty_cache)})
    line = error_line(result.stderr)
    culprit = "rage" if family == "multilabel" else bad
    assert (result.returncode == 2
            and f"{task / f'{split}.jsonl'}:3: answer {culprit!r} is not one of the labels" in line)
    assert not empty_cache.exists()  # refused before the model was converted


def test_arguments_are_checked_before_any_model_work(tmp_path, data_dir):
    empty_cache = tmp_path / "cache"
    env = {"MANYICL_CACHE": str(empty_cache)}
    result = manyicl("show-sequence", "--data", data_dir / "sst2", "--objective", "many_shot_some", env=env)
    assert result.returncode == 2 and "--objective: unknown objective 'many_shot_some'" in error_line(result.stderr)
    assert result.stderr.count("\n") == 1  # nothing before it: no conversion progress
    cfg = write_config(tmp_path / "c.yaml", {"tasks": {"data_dir": str(data_dir), "meta_train": ["sst2"]},
                                             "training": {"objective": "many_shot_some"}})
    for command in ("train", "eval", "compare"):
        result = manyicl(command, cfg, env=env)
        assert result.returncode == 2 and "training.objective" in error_line(result.stderr), command
    result = manyicl("predict", "--demos", data_dir / "sst2" / "train.jsonl", "--inputs", data_dir / "sst2" /
                     "test.jsonl", "--output", tmp_path / "p.jsonl", "--shots", "many", env=env)
    assert result.returncode == 2 and "--shots" in error_line(result.stderr)
    assert not empty_cache.exists()


def test_the_first_run_converts_the_model_with_one_line(tmp_path, data_dir):
    result = manyicl("show-sequence", "--data", data_dir / "sst2", "--max-tokens", "64",
                     env={"MANYICL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    progress = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("-- sst2")]
    assert len(progress) == 1 and "converting" in progress[0], result.stderr[-2000:]
    assert (tmp_path / "cache" / "models" / "smollm2-135m" / "config.json").exists()
