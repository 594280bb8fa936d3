"""Reading tasks: a task directory (``train.jsonl``, ``test.jsonl``, optional ``task.yaml``), a folder of such
directories (the layout of ``shared/data``), a single JSONL/CSV/TSV file with a field mapping, or a Hugging Face
``datasets`` source. Every malformed record is reported as ``file:line: field: problem — what to do``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from manyicl.errors import ManyICLError
from manyicl.tasks import Example, Task

# ---------------------------------------------------------------- reading records


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManyICLError(f"{path}: file not found") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManyICLError(f"{path}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _record_to_example(
    record: Any, where: str, input_field: str = "input", output_field: str = "output", answers_field: str = "answers",
    require_output: bool = True,
) -> Example:
    if not isinstance(record, dict):
        raise ManyICLError(f"{where}: expected a JSON object with {input_field!r} and {output_field!r}")
    values = {output_field: ""}
    for name in (input_field, output_field) if require_output else (input_field,):
        if name not in record:
            raise ManyICLError(f"{where}: missing field {name!r}; every record needs {input_field!r} and "
                               f"{output_field!r}")
        value = record[name]
        if not isinstance(value, str):
            raise ManyICLError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        values[name] = value.strip()
    if not require_output and isinstance(record.get(output_field), str):
        values[output_field] = record[output_field].strip()
    if require_output and not values[output_field]:
        raise ManyICLError(f"{where}: field {output_field!r} is empty; every example needs an answer")
    answers = record.get(answers_field) or ()
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise ManyICLError(f"{where}: field {answers_field!r} must be a list of strings")
    choices = record.get("choices") or ()
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ManyICLError(f"{where}: field 'choices' must be a list of strings (the option texts in letter order)")
    return Example(values[input_field], values[output_field], tuple(a.strip() for a in answers), where,
                   tuple(c.strip() for c in choices))


def read_jsonl(path: Path, input_field="input", output_field="output", answers_field="answers",
               require_output=True) -> list[Example]:
    return parse_jsonl(_read_text(path), str(path), input_field, output_field, answers_field, require_output)


def parse_jsonl(text: str, where: str, input_field="input", output_field="output", answers_field="answers",
                require_output=True) -> list[Example]:
    """Examples from JSONL text (a file's, or one pasted into a request); errors name ``where:line``."""
    examples = []
    # Split on "\n" only: str.splitlines() would also split inside records at U+0085 (see shared/data/MANIFEST.md).
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManyICLError(f"{where}:{lineno}: not valid JSON ({e.msg}); "
                               "each line must be one JSON object") from None
        examples.append(_record_to_example(record, f"{where}:{lineno}", input_field, output_field, answers_field,
                                           require_output))
    return examples


def read_delimited(path: Path, delimiter: str, input_field="input", output_field="output",
                   require_output=True) -> list[Example]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    required = (input_field, output_field) if require_output else (input_field,)
    missing = [f for f in required if f not in (reader.fieldnames or [])]
    if missing:
        raise ManyICLError(f"{path}:1: header has no column {missing[0]!r}; set input_field/output_field to one of "
                           f"{reader.fieldnames}")
    examples = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if any(row.get(f) is None for f in required):
            raise ManyICLError(f"{where}: row has fewer columns than the header")
        examples.append(_record_to_example(row, where, input_field, output_field, require_output=require_output))
    return examples


def read_examples(
    path: Path, input_field="input", output_field="output", answers_field="answers", require_output=True
) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, input_field, output_field, answers_field, require_output)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "," if suffix == ".csv" else "\t", input_field, output_field, require_output)
    raise ManyICLError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv")


def yaml_error(path: Path, error: Exception) -> str:
    """One line: file:line:column and the parser's own words (its message otherwise spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}: not valid YAML ({problem}); fix the file"


def _read_task_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        meta = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ManyICLError(yaml_error(path, e)) from None
    if not isinstance(meta, dict):
        raise ManyICLError(f"{path}: expected a mapping of keys (family, metric, labels, template)")
    known = {"family", "metric", "language", "labels", "template", "instruction"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ManyICLError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return meta


# ---------------------------------------------------------------- loaders


def load_task_dir(path: str | Path, name: str | None = None, family: str | None = None, **overrides: Any) -> Task:
    """A directory with train.jsonl, test.jsonl (optional) and task.yaml (optional)."""
    path = Path(path)
    if not path.is_dir():
        raise ManyICLError(f"{path}: task directory not found")
    train_path = path / "train.jsonl"
    if not train_path.exists():
        raise ManyICLError(f"{path}: no train.jsonl; a task directory needs train.jsonl (and usually test.jsonl)")
    meta = _read_task_yaml(path / "task.yaml")
    test_path = path / "test.jsonl"
    train = read_jsonl(train_path)
    test = read_jsonl(test_path) if test_path.exists() else []
    if not train:
        raise ManyICLError(f"{train_path}: the task has no training examples; add lines or drop the task")
    template = dict(meta.get("template") or {})
    if meta.get("instruction"):
        template["instruction"] = meta["instruction"]
    template.update(overrides.pop("template", None) or {})
    return Task(
        name=name or path.name,
        family=family or meta.get("family", "generation"),
        metric=overrides.pop("metric", None) or meta.get("metric", ""),
        labels=overrides.pop("labels", None) or meta.get("labels"),
        language=meta.get("language", "en"),
        template=template,
        train=train,
        test=test,
        source=str(path / "task.yaml") if (path / "task.yaml").exists() else str(path),
    )


def list_task_dirs(folder: str | Path) -> list[str]:
    """Names of the task directories (those holding a train.jsonl) inside a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManyICLError(f"{folder}: data folder not found")
    return sorted(p.name for p in folder.iterdir() if (p / "train.jsonl").exists())


def load_task_file(
    train_path: str | Path,
    name: str,
    family: str,
    test_path: str | Path | None = None,
    input_field: str = "input",
    output_field: str = "output",
    answers_field: str = "answers",
    **kwargs: Any,
) -> Task:
    """A task from single JSONL/CSV/TSV files with a field mapping."""
    train = read_examples(Path(train_path), input_field, output_field, answers_field)
    test = read_examples(Path(test_path), input_field, output_field, answers_field) if test_path else []
    if not train:
        raise ManyICLError(f"{train_path}: the task has no training examples")
    return Task(name=name, family=family, train=train, test=test, source=str(train_path), **kwargs)


def load_hf_task(
    dataset: str,
    name: str,
    family: str,
    config: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    data_files: dict[str, str] | None = None,
    input_field: str = "input",
    output_field: str = "output",
    answers_field: str = "answers",
    **kwargs: Any,
) -> Task:
    """A task from Hugging Face ``datasets`` (a hub id, or a builder such as "json" with ``data_files``)."""
    import datasets

    def split(split_name: str) -> list[Example]:
        try:
            rows = datasets.load_dataset(dataset, config, split=split_name, data_files=data_files)
        except Exception as e:  # datasets raises many types; the user needs the message, not the type
            raise ManyICLError(f"datasets {dataset!r} split {split_name!r}: {str(e).splitlines()[0]}") from None
        return [
            _record_to_example(row, f"{dataset}[{split_name}]:{i}", input_field, output_field, answers_field)
            for i, row in enumerate(rows)
        ]

    train = split(train_split)
    test = split(test_split) if test_split else []
    return Task(name=name, family=family, train=train, test=test, source=f"datasets:{dataset}", **kwargs)
