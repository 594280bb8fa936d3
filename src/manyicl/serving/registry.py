"""The registry of served tasks: each task's definition and demonstrations, in SQLite (WAL) under ``--state``.

A registration is committed before its response is sent (synchronous=FULL), so a restart, a kill -9 included,
loses no task that was acknowledged; the server rebuilds every task from here, and the same definition gives the
same demonstrations, prefix and predictions. Without ``--state`` the registry lives in memory.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from manyicl.serving.schemas import TaskSpec

SCHEMA = """CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- the TaskSpec as JSON, as registered
    registered_at REAL NOT NULL
)"""


class Registry:
    def __init__(self, state: Path | None):
        self.path = state / "registry.sqlite3" if state else None
        if state:
            state.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()  # one connection, shared by the event loop's threads
        with self._lock:
            if self.path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)

    def put(self, spec: TaskSpec, registered_at: float) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO tasks (name, spec, registered_at) VALUES (?, ?, ?)",
                             (spec.name, spec.model_dump_json(), registered_at))

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM tasks WHERE name = ?", (name,)).rowcount > 0

    def all(self) -> list[tuple[TaskSpec, float]]:
        with self._lock:
            rows = self._db.execute("SELECT spec, registered_at FROM tasks ORDER BY registered_at").fetchall()
        return [(TaskSpec.model_validate_json(spec), at) for spec, at in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
