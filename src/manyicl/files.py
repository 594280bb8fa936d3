"""Writing outputs so that a kill mid-write, or a full disk, never leaves a partial file behind, and turning the
operating system's refusals (a full disk, no permission, a file where a folder should be) into one line saying
which path and what to do."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from manyicl.errors import ManyICLError

# what to do about each refusal of the operating system, by errno
OS_ADVICE = {
    errno.ENOSPC: ("the disk is full; free some space or write to another folder, then run again "
                   "(finished work is kept)"),
    errno.EDQUOT: "the disk quota is used up; free some space or write to another folder, then run again",
    errno.EACCES: "no permission to write there; choose a folder you own or fix its permissions",
    errno.EPERM: "not permitted; choose a folder you own or fix its permissions",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EISDIR: "that is a folder; name a file",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "it exists already; choose another path or remove it",
}


def with_path(e: OSError, path: Path | str) -> OSError:
    """``e`` naming ``path`` when it names no file (a failed write does not say which file it was writing)."""
    return e if e.filename is not None else OSError(e.errno, e.strerror, str(path))


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path, what the system said, and what to do."""
    said = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    advice = OS_ADVICE.get(e.errno, "check the path and the disk")
    return f"{e.filename}: {said}; {advice}" if e.filename is not None else f"{said}; {advice}"


def check_output_file(path: Path, option: str) -> None:
    """Before any work: ``path`` can become a file (its missing folders are made when it is written)."""
    if path.is_dir():
        raise ManyICLError(f"{option} {path}: is a folder; name a file in it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ManyICLError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
            break


def read_records(path: Path, start_again: str) -> list:
    """The JSON list of records a run keeps in ``path`` ([] when there is none yet); a file that is not JSON is a
    one-line error saying to move it away to ``start_again``."""
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ManyICLError(f"{path}: not valid JSON; move it away to {start_again}") from None


def read_log(path: Path) -> list[dict]:
    """The records of a JSON Lines log such as train_log.jsonl ([] when there is none); a line cut off mid-write
    is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def logged_tokens(path: Path, up_to_step: int | None = None) -> int:
    """Tokens a train_log.jsonl counts, over every step or those up to ``up_to_step``."""
    return sum(r.get("tokens") or 0 for r in read_log(path) if up_to_step is None or r["step"] <= up_to_step)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` through (a file or a folder): flushed to disk and renamed over
    ``path`` when the block ends, removed if it fails, so ``path`` is either the old one or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)  # same suffix: writers that choose a format by it
    try:
        try:
            yield tmp
        except OSError as e:
            raise with_path(e, path) from e
        fsync_folder(tmp) if tmp.is_dir() else _fsync(tmp)
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over another: the old one steps aside
            old = path.with_name(path.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)  # left by a kill between the renames below
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # the old folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (a rename is atomic on POSIX)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def fsync_folder(folder: Path) -> None:
    """Every file under ``folder`` flushed to disk (before a marker says the folder is complete)."""
    for f in folder.rglob("*"):
        if f.is_file():
            _fsync(f)


def clear_folder(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what ``folder`` holds but the names in ``keep`` (the run's lock)."""
    for child in folder.iterdir():
        if child.name in keep:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


DISK_FULL_BYTES = 1 << 20  # free space below this after a failed write: the disk filled up


def disk_full(folder: Path) -> bool:
    """Whether a write under ``folder`` just failed for want of space (asked when a library's save fails without an
    OSError: torch and safetensors raise their own errors). A write that fails for space fills the disk first, so
    the free space is nearly nothing; else a small probe write tells."""
    try:
        stats = os.statvfs(folder)
        if stats.f_bavail * stats.f_frsize < DISK_FULL_BYTES:
            return True
    except OSError:
        return False
    probe = folder / ".manyicl-space-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
