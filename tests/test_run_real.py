"""scripts/run_real.sh's `save`, in real processes on a throwaway records repository: it commits the last checkpoint of
a training in progress only while the session's diffs (binary files included, as the workplace's submission limit
counts them) stay under RUN_SUBMIT_MIB. A session whose saves replaced a 29 MB checkpoint a few times went over the
256 MiB limit and landed nothing; these tests fail on a `save` that commits every new checkpoint regardless."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_real.sh"
RUN = "runs/smoke"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def checkpoint(tree: Path, step: int, mib: int) -> None:
    """A training in progress (config.yaml, a log, no train_summary.json) with a complete checkpoint of random
    bytes (incompressible, like float weights)."""
    method = tree / RUN / "train" / "few_shot_ft"
    ckpt = method / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (method / "config.yaml").write_text("method: few_shot_ft\n")
    (method / "train_log.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, step + 1)))
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(mib << 20))
    (ckpt / "manyicl_complete.json").write_text("{}\n")


def save(tmp_path: Path, limit_mib: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "MANYICL_RUN_HERE": str(tmp_path / "tree"),
           "MANYICL_RECORDS_REPO": str(tmp_path / "records"), "RUN_CONFIG": str(tmp_path / "config.yaml"),
           "RUN_DIR": RUN, "RUN_SUBMIT_MIB": str(limit_mib), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(["bash", str(SCRIPT), "save-here"], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    records = tmp_path / "records"
    records.mkdir()
    git(records, "init", "-q", "-b", "main")
    (records / "README").write_text("records\n")
    git(records, "add", "README")
    git(records, "commit", "-q", "-m", "landed")  # the session's base: main's first reflog entry
    (tmp_path / "config.yaml").write_text("{}\n")  # the defaults: no budget points
    (tmp_path / "tree" / RUN).mkdir(parents=True)
    git((tmp_path / "tree"), "init", "-q")  # the run's worktree (save names its commit in the message)
    (tmp_path / "tree" / "f").write_text("code\n")
    git(tmp_path / "tree", "add", "f")
    git(tmp_path / "tree", "commit", "-q", "-m", "run commit")
    return tmp_path


def committed(records: Path) -> list[str]:
    return git(records, "ls-tree", "-r", "--name-only", "HEAD").split()


def test_save_commits_the_checkpoint_within_the_limit(layout: Path):
    checkpoint(layout / "tree", 50, 1)
    out = save(layout, limit_mib=50)
    assert out.returncode == 0, out.stderr
    dest = "docs/results/smoke/train/few_shot_ft"
    assert f"{dest}/checkpoints/checkpoint-50/adapter_model.safetensors" in committed(layout / "records")
    assert "this session's diffs: 1 MiB" in out.stdout


def test_save_keeps_the_last_checkpoint_where_a_new_one_would_pass_the_limit(layout: Path):
    tree, records = layout / "tree", layout / "records"
    checkpoint(tree, 50, 2)
    assert save(layout, limit_mib=4).returncode == 0  # 2 MiB (x 4/3 as base85): within 4
    checkpoint(tree, 100, 2)  # replacing it: 2 MiB removed and 2 MiB added, 8 MiB in all: over
    out = save(layout, limit_mib=4)
    assert out.returncode == 0, out.stderr
    assert "it is not committed (the last committed checkpoint stays)" in out.stdout
    dest = "docs/results/smoke/train/few_shot_ft"
    files = committed(records)
    assert f"{dest}/checkpoints/checkpoint-50/adapter_model.safetensors" in files
    assert not any("checkpoint-100" in f for f in files)
    # the folder the next session restores from is the committed one: the log ends at the checkpoint's step
    assert not (records / dest / "checkpoints" / "checkpoint-100").exists()
    assert (records / dest / "train_log.jsonl").read_text().count("\n") == 50
    assert git(records, "status", "--porcelain") == ""


def test_size_reports_the_sessions_diffs(layout: Path):
    checkpoint(layout / "tree", 50, 3)
    assert save(layout, limit_mib=50).returncode == 0
    out = subprocess.run(["bash", str(SCRIPT), "size"], capture_output=True, text=True,
                         env={**os.environ, "MANYICL_RECORDS_REPO": str(layout / "records")}, timeout=60)
    assert out.returncode == 0, out.stderr
    mib = int(out.stdout.split("MiB")[0].rsplit(" ", 2)[-2])
    assert 3 <= mib <= 5, out.stdout  # 3 MiB of random bytes, deflated and base85-encoded


def script(layout: Path, command: str) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MANYICL_RECORDS_REPO": str(layout / "records")})
    assert out.returncode == 0, out.stderr
    return out


def test_size_counts_from_the_commit_the_session_started_at(layout: Path):
    """A workspace may carry the last session's commits and reflog: the session's base is the commit resume (here
    session-start) marked, while the mark is younger than a session; an older mark falls back to the reflog."""
    records = layout / "records"
    (records / "previous.bin").write_bytes(os.urandom(3 << 20))  # the last session's landed commit
    git(records, "add", "previous.bin")
    git(records, "commit", "-q", "-m", "landed last session")
    assert "this session's base" in script(layout, "session-start").stdout
    assert "this session's base" not in script(layout, "session-start").stdout  # marked once per session
    checkpoint(layout / "tree", 50, 1)
    assert save(layout, limit_mib=50).returncode == 0
    assert "diffs (from " in (out := script(layout, "size").stdout) and int(out.split("MiB")[0].rsplit(" ", 2)[-2]) <= 2
    marker = Path(git(records, "rev-parse", "--absolute-git-dir").strip()) / "manyicl-session-base"
    os.utime(marker, (marker.stat().st_mtime - 4 * 3600,) * 2)  # a mark from an earlier session
    assert int(script(layout, "size").stdout.split("MiB")[0].rsplit(" ", 2)[-2]) >= 4


def task_level_task(tree: Path, task: str) -> None:
    """A per-task LoRA of task_level whose training is finished (train_summary.json written last)."""
    folder = tree / RUN / "train" / "task_level" / task
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(1 << 16))
    (folder / "adapter" / "adapter_config.json").write_text("{}\n")
    (folder / "train_summary.json").write_text("{}\n")


def test_save_keeps_the_weights_of_a_task_level_lora_not_yet_evaluated(layout: Path):
    """records leaves per-task weights out (the stage evaluates each LoRA right after training it); one trained but
    not evaluated when the session stops must keep its weights, or the resumed stage cannot evaluate it."""
    tree = layout / "tree"
    (layout / "config.yaml").write_text("evaluation: {learning_curve: true, curve_sequences: 2}\n")
    for task in ("sst2", "trec", "rte"):
        task_level_task(tree, task)
    run = tree / RUN
    cell = {"method": "task_level", "task": "sst2"}
    (run / "results.json").write_text(json.dumps([cell, {"method": "task_level", "task": "trec"}]))
    (run / "curves.json").write_text(json.dumps([cell, cell, {"method": "task_level", "task": "trec"}]))
    out = save(layout, limit_mib=50)
    assert out.returncode == 0, out.stderr
    weights = {f.split("/")[-3] for f in committed(layout / "records") if f.endswith("adapter_model.safetensors")}
    assert weights == {"trec", "rte"}  # sst2: cell and curve done; trec: its curve is not; rte: nothing yet


def test_stopping_a_saver_that_has_already_ended_does_not_end_the_stages():
    """The stages run under `set -euo pipefail`; a stage stops its 20-minute saver when its work is done. If the saver
    has ended by then (killing its `sleep` ends its loop), a failing `kill` ended the whole script before the stage
    was recorded as done (eval-zero_shot_ft, 2026-12-05). Fails on a stop_saver whose kill can fail."""
    script = (f"set -euo pipefail; source <(sed -n '/^stop_saver()/,/^}}/p' {SCRIPT}); "
              "( exit 0 ) & saver=$!; wait $saver; stop_saver; echo survived")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "survived", out
