"""Tasks: named sets of (input, output) examples with a family, a metric and, for label-set families, labels.

Loaders read a task directory (``train.jsonl``, ``test.jsonl``, optional ``task.yaml``), a folder of such
directories (the layout of ``shared/data``), a single JSONL/CSV/TSV file with a field mapping, or a Hugging Face
``datasets`` source. Every malformed record is reported as ``file:line: field: problem — what to do``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from manyicl.errors import ManyICLError
from manyicl.families import FAMILIES
from manyicl.metrics import METRICS


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    answers: tuple[str, ...] = ()  # all gold answers when there are several (QA, multi-reference summaries)
    source: str = ""  # "file:line", for error messages
    choices: tuple[str, ...] = ()  # multiple choice: the option texts in letter order (output is the letter)

    @property
    def golds(self) -> tuple[str, ...]:
        return self.answers or (self.output,)


@dataclass
class Task:
    name: str
    family: str
    train: list[Example]
    test: list[Example]
    metric: str = ""
    labels: tuple[str, ...] | None = None
    template: dict[str, Any] = field(default_factory=dict)  # overrides of formatter.Template fields
    language: str = "en"
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.family not in FAMILIES:
            raise ManyICLError(f"{where}: family: unknown family {self.family!r}; use one of {', '.join(FAMILIES)}")
        self.metric = self.metric or FAMILIES[self.family].metric
        if self.metric not in METRICS:
            raise ManyICLError(f"{where}: metric: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if not self.train and not self.test:
            raise ManyICLError(f"{where}: the task has no examples; add lines to train.jsonl / test.jsonl")
        if FAMILIES[self.family].label_set:
            if self.labels is None:
                self.labels = derive_labels(self.train or self.test, self.family)
            else:
                # queries without an answer (predict's inputs) have nothing to check
                check_labels([ex for ex in (*self.train, *self.test) if ex.output], tuple(self.labels), self.family,
                             where)
            self.labels = tuple(self.labels)

    def label_of(self, example: Example) -> str:
        """The class an example belongs to for label-balanced sampling (its whole output)."""
        return example.output

    def order(self, rng: random.Random) -> list[int]:
        """Indices of train examples in i.i.d. order: the order of training sequences. No rounds or other structure,
        so an answer can never be guessed from the answers before it (tests/test_leakage.py)."""
        indices = list(range(len(self.train)))
        rng.shuffle(indices)
        return indices

    def balanced_picks(self, rng: random.Random) -> list[int]:
        """Indices in the order examples are PICKED for label-balanced evaluation prompts: one example per label in
        turn (each turn's labels in random order), so any leading run holds every label equally often, to one, with
        the remainder on random labels. The picked examples are then laid out in a fresh random order
        (Prompter.choose_demonstrations): this order only decides which examples are used, never where they stand."""
        indices = self.order(rng)
        if not FAMILIES[self.family].label_set:
            return indices
        by_label: dict[str, list[int]] = {}
        for i in indices:
            by_label.setdefault(self.label_of(self.train[i]), []).append(i)
        out = []
        for k in range(max(len(g) for g in by_label.values())):
            turn = [g[k] for g in by_label.values() if k < len(g)]
            rng.shuffle(turn)
            out += turn
        return out


def choice_text(example: Example, letter: str) -> str:
    """The option text that a multiple-choice answer letter names."""
    index = ord(letter) - ord("A")
    if len(letter) != 1 or not 0 <= index < len(example.choices):
        raise ManyICLError(f"{example.source}: answer {letter!r} is not a letter of its {len(example.choices)} choices")
    return example.choices[index]


def answer_form(task: Task, multiple_choice: str = "cloze") -> str:
    """How a task's answers are written, in training and evaluation alike: "cloze" (a multiple-choice answer is the
    chosen option's text, as lm-evaluation-harness scores ARC and OpenBookQA) when every example carries its
    ``choices`` and ``format.multiple_choice`` asks for it; "letter" for other multiple-choice tasks; "label" for
    the other ranked families; "generated" for the rest."""
    if task.family != "multiple_choice":
        return "label" if FAMILIES[task.family].ranked else "generated"
    with_choices = all(ex.choices for ex in task.train + task.test)
    return "cloze" if multiple_choice == "cloze" and with_choices else "letter"


def take_fitting(indices: Iterable[int], cost: Callable[[int], int], budget: int) -> list[int]:
    """The leading ``indices`` whose summed costs stay within ``budget`` (whole examples, in order)."""
    kept, used = [], 0
    for i in indices:
        c = cost(i)
        if used + c > budget:
            break
        kept.append(i)
        used += c
    return kept


def answer_labels(example: Example, family: str) -> list[str]:
    """The labels an answer names: one, or each of a multilabel list."""
    return FAMILIES[family].labels_of(example.output)


def check_labels(examples: Iterable[Example], labels: tuple[str, ...], family: str, where: str) -> None:
    """Every answer of a task with declared labels is one of them (each label of a multilabel answer), or one line
    naming the record: an answer outside the set could never be predicted, and would be silently scored wrong."""
    known = set(labels)
    for ex in examples:
        for label in answer_labels(ex, family):
            if label not in known:
                raise ManyICLError(f"{ex.source or where}: answer {label!r} is not one of the labels declared in "
                                   f"{where} ({', '.join(labels)}); add it to labels or correct the record")


def derive_labels(examples: Iterable[Example], family: str) -> tuple[str, ...]:
    return tuple(sorted({label for ex in examples for label in FAMILIES[family].labels_of(ex.output)}))


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
