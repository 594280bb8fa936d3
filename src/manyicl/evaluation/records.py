"""The record of one evaluated cell: what runner.py writes into results.json and the report reads back.

results.json stays a JSON list of records, one object per (task, shots, seed) cell, because scripts, tests and
the checkout of a long run started at an older commit read it as one; each record carries ``schema_version``.
Version 1 is every record written before the version was: it may lack keys added since (role, the interval,
answer_form, predictions, backend, ...) and reads with their defaults. A record is written back in the current
version (a version-1 file that a rerun extends is upgraded record by record); keys this version does not know are
kept. A record of a newer version than this code knows is refused rather than half read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from manyicl.errors import ManyICLError
from manyicl.files import read_records, write_atomic

SCHEMA_VERSION = 2
# keys every version has written: a record without one was not written by manyicl eval
REQUIRED = ("model", "method", "task", "family", "metric", "shots", "shots_requested", "seed", "value", "n")
WRITTEN_WHEN_NONE = ("adapter", "max_tokens")  # the other None fields are absent from the JSON (not measured)


def cell_key(method: str, model: str, adapter: str | None, task: str, shots: Any, seed: int) -> tuple:
    """The one identity of a cell, for planning and for records read back from results.json."""
    return (method, model, adapter, task, str(shots), seed)


@dataclass(frozen=True, kw_only=True)
class CellRecord:
    """One (method, task, shots, seed) cell: its identity, its metric with a 95 % interval over queries, and how it
    was measured. The field order is the key order of results.json."""

    model: str
    adapter: str | None = None
    method: str
    role: str = "held_out"  # held_out, forgetting or in_distribution
    task: str
    family: str
    metric: str
    shots: int  # demonstrations used
    shots_requested: int | str  # as asked for: a count, "max" or "max@N"
    seed: int
    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    n: int  # queries, the skipped ones included
    skipped: int = 0  # queries too long for the context, scored as wrong
    prefix_tokens: int = 0
    max_tokens: int | None = None  # the context budget of the cell
    answer_form: str = ""
    scoring: str | None = None  # ranked families: the scoring that predicts
    metric_setup: str | None = None  # rouge_l: its tokenizer and stemmer
    # label-set families: the label histograms, and whether one label took >= 90 % of the predictions
    demo_labels: dict[str, int] | None = None
    prediction_counts: dict[str, int] | None = None
    gold_counts: dict[str, int] | None = None
    collapsed: bool | None = None
    predictions: str | None = None  # the per-query rows, relative to the run folder
    prefix_cache: bool | None = None
    backend: str | None = None
    seconds: float = 0.0
    same_prompts_as: int | str | None = None  # the shots of the earlier cell whose outputs this one reuses
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, written back as read

    @property
    def key(self) -> tuple:
        return cell_key(self.method, self.model, self.adapter, self.task, self.shots_requested, self.seed)

    @property
    def is_collapsed(self) -> bool:
        return bool(self.collapsed)

    def to_json(self) -> dict[str, Any]:
        """The record as results.json holds it, in the current schema version."""
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in FIELDS:
            value = getattr(self, f)
            if value is not None or f in WRITTEN_WHEN_NONE:
                data[f] = value
        return data | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> CellRecord:
        """A record of any schema version up to this one; ``where`` names it in an error."""
        if not isinstance(data, dict):
            raise ManyICLError(f"{where}: a record is a JSON object, not {type(data).__name__}; move the file away "
                               "to evaluate again")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ManyICLError(f"{where}: schema_version {version!r} is newer than this manyicl reads "
                               f"({SCHEMA_VERSION}); update manyicl to read it")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ManyICLError(f"{where}: a cell record without {', '.join(missing)}; it was not written by manyicl "
                               "eval: move the file away to evaluate again")
        known = {k: v for k, v in data.items() if k in FIELDS}
        extra = {k: v for k, v in data.items() if k not in FIELDS and k != "schema_version"}
        return cls(**known, extra=extra)


FIELDS = tuple(f.name for f in fields(CellRecord) if f.name != "extra")


def read_cell_records(path: Path, start_again: str = "evaluate again") -> list[CellRecord]:
    """The records of a results.json (or a rank's partial file); [] when there is none yet."""
    data = read_records(path, start_again)
    if not isinstance(data, list):
        raise ManyICLError(f"{path}: not a list of cell records; move it away to {start_again}")
    return [CellRecord.from_json(r, f"{path}: record {i + 1}") for i, r in enumerate(data)]


def records_json(records: list[CellRecord]) -> list[dict[str, Any]]:
    return [r.to_json() for r in records]


def write_cell_records(path: Path, records: list[CellRecord]) -> None:
    """results.json rewritten atomically: a reader never sees half a file."""
    write_atomic(path, json.dumps(records_json(records), indent=1, ensure_ascii=False))
