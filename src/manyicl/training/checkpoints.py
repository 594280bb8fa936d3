"""Run directories and checkpoints: what identifies a run (the config hash), which checkpoint is complete,
and what may be resumed. A checkpoint counts only once its marker file is written, last and atomically, so a
run killed while saving resumes from the checkpoint before."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from manyicl.config import ExperimentConfig, drop_speed_settings, load_config
from manyicl.errors import ManyICLError
from manyicl.files import clear_folder, disk_full, fsync_folder, with_path, write_atomic
from manyicl.runlock import LOCK_NAME

CHECKPOINT_MARKER = "manyicl_complete.json"  # written last: a checkpoint without it is incomplete
TASK_COUNTS = "manyicl_task_counts.json"  # per-task sequences/answers so far, restored on --resume


def config_hash(config: ExperimentConfig) -> str:
    """What decides the weights: everything but where outputs go and how evaluation runs. The precision as asked
    for (auto may resolve differently elsewhere) is left out: the resolved one is in each checkpoint's marker and
    checked on resume (check_precision)."""
    data = drop_speed_settings(config.model_dump(mode="json"))
    data.get("training", {}).pop("precision", None)
    for key in ("output_dir", "evaluation", "compare", "name"):
        data.pop(key, None)
    # what is evaluated afterwards, not trained on
    for key in ("held_out", "forgetting", "in_distribution", "distance"):
        data.get("tasks", {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _saved_config_hash(out: Path) -> str | None:
    """The config hash of the run already in ``out`` (its config.yaml), None when there is none to read."""
    try:
        return config_hash(load_config(out / "config.yaml"))
    except ManyICLError:
        return None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step of a checkpoint folder (``checkpoint-<step>``, as the Trainer names them)."""
    return int(checkpoint.name.split("-")[1])


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).exists()]
    return max(done, key=checkpoint_step, default=None)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, chash: str) -> Path | None:
    """Returns the checkpoint to resume from. Refuses to mix runs in one directory."""
    holds_run = (out / "config.yaml").exists() or (out / "train_log.jsonl").exists()
    if holds_run and overwrite:
        if int(os.environ.get("RANK", "0")) == 0:  # one rank clears; the others must not race it
            clear_folder(out, keep=(LOCK_NAME,))
        holds_run = False
    if not resume:
        if holds_run:
            raise ManyICLError(f"{out}: already holds a run; use --resume to continue it or --overwrite to replace it")
        return None
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    if checkpoint is None:
        if not holds_run:
            return None
        if (out / "adapter").exists() or _saved_config_hash(out) != chash:
            raise ManyICLError(f"{out}: no complete checkpoint to resume from; use --overwrite to start again")
        # the same run, stopped before its first checkpoint: nothing to lose, so resuming starts it again
        warnings.warn(f"{out}: stopped before its first checkpoint; starting it again from step 0", stacklevel=2)
        clear_folder(out, keep=(LOCK_NAME,))
        return None
    try:
        marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        raise ManyICLError(f"{checkpoint}: corrupt checkpoint marker; delete the folder or use --overwrite") from None
    if marker.get("config") != chash:
        raise ManyICLError(f"{checkpoint}: made with a different config (model/tasks/training); use --overwrite or "
                           "the original config")
    check_readable(checkpoint)
    return checkpoint


def check_precision(checkpoint: Path, precision: str) -> None:
    """A run resumes in the precision it started in: ``auto`` may resolve differently on another machine (or
    under another manyicl version), and the config hash cannot see that. Markers written before the precision was
    recorded are not checked."""
    started = json.loads((checkpoint / CHECKPOINT_MARKER).read_text()).get("precision")
    if started is not None and started != precision:
        raise ManyICLError(f"{checkpoint}: trained in {started}, but this run resolves training.precision to "
                           f"{precision}; set training.precision: {started} to resume it, or use --overwrite")


def check_readable(checkpoint: Path) -> None:
    """Cheap integrity check before resuming: weight headers parse, state files exist and parse."""
    from safetensors import safe_open

    try:
        for weights in checkpoint.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        json.loads((checkpoint / "trainer_state.json").read_text())
        json.loads((checkpoint / TASK_COUNTS).read_text())
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (checkpoint / name).exists():
                raise OSError(f"{name} is missing")
    except Exception as e:  # safetensors, json and OS errors all mean the same thing here
        raise ManyICLError(f"{checkpoint}: cannot resume from this checkpoint, it is corrupt "
                           f"({str(e).splitlines()[0][:160]}); "
                           f"delete it to resume from an earlier one, or use --overwrite") from None


def check_matches_model(checkpoint: Path, model: Any) -> None:
    """The checkpoint's weights have this model's shapes, read from the safetensors headers before any training
    work. The config hash names the model but cannot see it change under that name (a local folder replaced, a Hub
    id updated); loading such a checkpoint would fail inside the Trainer, in ``load_state_dict``."""
    from safetensors import safe_open

    expected = {name: list(tensor.shape) for name, tensor in _resumed_state(model).items()}
    for weights in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                saved = list(f.get_slice(name).get_shape())
                if name in expected and saved != expected[name]:
                    raise ManyICLError(f"{checkpoint}: cannot resume from this checkpoint, it does not match this "
                                       f"model ({name} is {saved} there, {expected[name]} here); resume with the "
                                       "model it was trained from, or use --overwrite")


def _resumed_state(model: Any) -> dict[str, Any]:
    """What the Trainer loads back into ``model`` from a checkpoint, under the names it is saved with: the adapter's
    weights of a PEFT model, every weight of a fully fine-tuned one."""
    from peft import PeftModel, get_peft_model_state_dict

    return get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()


def resumed_task_counts(checkpoint: Path) -> dict[str, dict[str, int]]:
    """Sequences and answers per task up to the checkpoint (summed over ranks), which a resumed run continues."""
    return json.loads((checkpoint / TASK_COUNTS).read_text())


def mark_complete(folder: Path, step: int, chash: str, precision: str, task_counts: dict) -> None:
    """The checkpoint in ``folder`` counts from here on: the per-task counts, then the marker, once everything
    before it is on disk."""
    fsync_folder(folder)
    write_atomic(folder / TASK_COUNTS, json.dumps(task_counts))
    write_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": step, "config": chash, "precision": precision}))


@contextmanager
def saving(folder: Path) -> Iterator[None]:
    """A library's save into ``folder``: a partial folder is removed, and a full disk reported as such (torch and
    safetensors raise their own error types for it, with no path)."""
    try:
        yield
    except Exception as e:
        full = not isinstance(e, OSError) and disk_full(folder.parent)  # asked before the partial folder goes
        shutil.rmtree(folder, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from e
        if isinstance(e, OSError):
            raise with_path(e, folder) from e
        raise


def truncate_log(path: Path, step: int) -> None:
    """After a crash the log may hold steps past the checkpoint: they are redone, so drop them."""
    if path.exists():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        write_atomic(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """The step of a log line; a line cut off mid-write (a full disk, a kill) counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")

