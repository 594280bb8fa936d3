"""One process per run folder: ``train``, ``eval``, ``compare`` and ``report`` hold a lock on the folder they
write, so that a second process started on the same folder refuses in one line instead of rewriting the same
checkpoints, logs and results.json.

The lock is ``fcntl.flock`` on ``<folder>/manyicl.lock``: the kernel releases it whenever its process ends (a kill -9
included), so a lock left by a dead process is never in the way; the file says who holds it (pid, host, command,
since when), and when a new holder finds the details of a process that ended without tidying up, it says it takes
over. Re-entrant within one process (compare evaluates into the folder it holds), and held by rank 0 alone under
``accelerate launch`` (every rank writes the same folder by design).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from manyicl.errors import ManyICLError
from manyicl.files import with_path

LOCK_NAME = "manyicl.lock"
_held: dict[Path, int] = {}  # folder -> how many times this process holds it


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "manyicl" if name in ("cli.py", "__main__.py") else name  # python -m manyicl.cli is manyicl too


def _describe(holder: dict) -> str:
    if not holder.get("pid"):  # it took the lock a moment ago and has not written who it is yet
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} (`{holder.get('command', '?')}`)"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536) or b"{}")
    except ValueError:
        return {}


def _open_locked(path: Path) -> int:
    """The lock file, opened and locked (the same file as the path names: one unlinked by a holder that was
    releasing it is opened again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ManyICLError(f"{path.parent}: in use by {_describe(holder)}; wait for it to end, stop it, or use "
                               "another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder`` for this process; the folder is made if missing, and removed again on the way out if the
    lock was all it came to hold (a run refused before writing anything leaves nothing behind)."""
    folder = Path(folder).resolve()
    if folder in _held or int(os.environ.get("RANK", "0")) != 0:
        _held[folder] = _held.get(folder, 0) + 1
        try:
            yield
        finally:
            _held[folder] -= 1
            if not _held[folder]:
                del _held[folder]
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_locked(path)
    stale = _read(fd)
    if stale.get("pid"):
        click.echo(f"{folder}: taking over the lock of {_describe(stale)}, which ended without releasing it", err=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join([_program(), *sys.argv[1:]])}
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder).encode())
    except OSError as e:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made:
            _remove_if_empty(folder)
        raise with_path(e, path) from e
    _held[folder] = 1
    try:
        yield
    finally:
        del _held[folder]
        try:
            path.unlink()  # while still locked: a process waiting on the old file opens the path again
            if made:
                _remove_if_empty(folder)
        except OSError:
            pass
        os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    """A folder this run made, removed with its empty subfolders if the run wrote no file into it."""
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()
