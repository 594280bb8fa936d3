"""Writing outputs so that a kill mid-write never leaves a partial file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from manyicl.errors import ManyICLError


def read_records(path: Path, start_again: str) -> list:
    """The JSON list of records a run keeps in ``path`` ([] when there is none yet); a file that is not JSON is a
    one-line error saying to move it away to ``start_again``."""
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ManyICLError(f"{path}: not valid JSON; move it away to {start_again}") from None


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename over ``path`` (a rename is atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
