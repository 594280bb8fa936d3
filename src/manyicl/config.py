"""Experiment configs: plain YAML mapped onto typed pydantic objects; unknown keys are errors.

One file describes a whole experiment (model, tasks, meta-train / held-out split, objective, training,
evaluation, output directory). Any key can be overridden from the command line: ``--set training.max_tokens=2048``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

from manyicl.errors import ManyICLError
from manyicl.families import FAMILIES, SCORINGS
from manyicl.formatter import Formatter
from manyicl.methods import METHODS
from manyicl.metrics import METRICS
from manyicl.sequences import OBJECTIVES
from manyicl.task_files import yaml_error

Objective = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = "smollm2-135m"  # the embedded default, a hub id, or a local directory
    trust_remote_code: bool = False
    adapter: str | None = None  # a PEFT adapter to evaluate on top of the model


class TaskSpec(Strict):
    """A task: by name under ``tasks.data_dir``, or from a directory, a file, or Hugging Face ``datasets``."""

    name: str
    path: str | None = None  # task directory, or a JSONL/CSV/TSV file of training examples
    test_path: str | None = None  # with a file ``path``: the test examples
    dataset: str | None = None  # Hugging Face datasets id or builder ("json", "csv" with data_files)
    dataset_config: str | None = None
    data_files: dict[str, str] | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    synthetic: bool = False  # one of the generated tasks in manyicl.synthetic
    family: str | None = None
    metric: str | None = None
    labels: list[str] | None = None
    template: dict[str, Any] = Field(default_factory=dict)
    input_field: str = "input"
    output_field: str = "output"
    answers_field: str = "answers"

    @field_validator("family")
    @classmethod
    def _family(cls, v: str | None) -> str | None:
        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}; use one of {', '.join(FAMILIES)}")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(METRICS)}")
        return v


# A bare name (a directory under tasks.data_dir) or a full spec; the discriminator keeps errors specific.
TaskRef = Annotated[
    Union[Annotated[str, Tag("name")], Annotated[TaskSpec, Tag("spec")]],
    Discriminator(lambda v: "name" if isinstance(v, str) else "spec"),
]


class TasksConfig(Strict):
    data_dir: str | None = None  # a folder of task directories (the layout of shared/data)
    meta_train: list[TaskRef] = Field(default_factory=list)
    held_out: list[TaskRef] = Field(default_factory=list)
    forgetting: list[TaskRef] = Field(default_factory=list)  # benchmarks outside the mixture, for forgetting
    # mixture tasks evaluated on their test splits (evaluation.in_distribution_shots, and the learning curve): did
    # each fine-tune learn what it trained on?
    in_distribution: list[TaskRef] = Field(default_factory=list)
    # held-out task -> "near" (a task of its kind is in the mixture) or "far" (none is); the report groups by it
    distance: dict[str, Literal["near", "far"]] = Field(default_factory=dict)
    allow_overlap: bool = False  # allow a task in both meta_train and held_out (normally an error)
    max_train_examples: int | None = None  # cap per task, for quick runs
    synthetic_seed: int = 0


class FormatConfig(Strict):
    chat: bool = False  # render examples with the tokenizer's chat template
    template: dict[str, Any] = Field(default_factory=dict)  # overrides for every task (see formatter.Template)
    # multiple choice, in training AND evaluation: answers are the option texts (cloze, when records carry choices)
    # or the letters; one form per task, so a fine-tune is scored on the answers it was trained on
    multiple_choice: Literal["cloze", "letter"] = "cloze"

    def formatter(self, task: Any, tokenizer: Any) -> Formatter:
        """The one formatter of a task under this config: training sequences and evaluation prompts alike."""
        return Formatter.for_task(task, tokenizer, chat=self.chat, multiple_choice=self.multiple_choice,
                                  **self.template)


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[str, list[str]] = "all-linear"


class TrainingConfig(Strict):
    objective: Objective = "many_shot_all"
    max_tokens: int = Field(1024, gt=0)  # token budget per sequence
    n_shots: int = Field(5, ge=0)  # few_shot demonstrations (training sequences are always in i.i.d. order)
    pack: bool = False  # zero_shot / few_shot: pack isolated units up to max_tokens (same tokens per step as many-shot)
    loss_normalization: Literal["token", "target"] = "token"
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    max_steps: int | None = Field(100, gt=0)
    epochs: float | None = Field(None, gt=0)  # instead of max_steps: passes over the mixture's examples
    batch_size: int = Field(1, gt=0)  # per device
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = 1.0
    seed: int = 0
    mixture_temperature: float = Field(1.0, gt=0)  # P(task) ∝ min(size, cap) ** (1 / T)
    mixture_cap: int | None = Field(None, gt=0)
    gradient_checkpointing: bool = False
    # CPU only: return freed activations to the OS (lower peak RSS, slower steps; see memory.py).
    # None: on together with gradient_checkpointing
    release_freed_memory: bool | None = None
    save_steps: int = Field(50, gt=0)
    save_total_limit: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # how the model's weights are loaded
    # auto: bf16 autocast on a GPU with bf16 or a CPU with AVX-512 BF16 / AMX, else fp32 (precision.py);
    # trainable weights and optimizer state stay fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Trainer loggers by name, as in TrainingArguments: "tensorboard" (event files under <output_dir>/checkpoints/runs),
    # "wandb", ... (their packages installed); "none" by default
    report_to: Union[str, list[str]] = "none"


# a demonstration count, "max" (as many as fit in evaluation.max_tokens) or "max@4096" (as many as fit in 4,096)
Shots = Union[Annotated[int, Field(ge=0)], Annotated[str, StringConstraints(pattern=r"^max(@[1-9][0-9]*)?$")]]


class EvaluationConfig(Strict):
    shots: list[Shots] = Field(default_factory=lambda: [0, 4, 16, "max"])
    forgetting_shots: list[Shots] = Field(default_factory=lambda: [5])  # for tasks.forgetting
    in_distribution_shots: list[Shots] = Field(default_factory=lambda: ["max"])  # for tasks.in_distribution
    # the in-context learning curve (evaluation/curves.py): NLL of answer k given k - 1 answers, on curve_sequences
    # many-shot sequences of each held-out and in-distribution task's test split, one forward each
    learning_curve: bool = False
    curve_sequences: int = Field(20, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])  # demonstration draws per (task, shots)
    # test queries per cell (None: all); a 0/1 metric's interval is ±0.07 at 200
    max_queries: int | None = Field(200, gt=0)
    max_tokens: int | None = Field(None, gt=0)  # context budget; default: training.max_tokens
    # label-set families: as many demonstrations of each label as fit (the remainder on random labels), laid out in
    # one random order; false: an i.i.d. sample of the train split
    balance_labels: bool = True
    # how label candidates are ranked (all four are kept per query; see evaluation/cells.py and docs/EVALUATION.md)
    scoring: Literal[SCORINGS] = "sum"  # type: ignore[valid-type]
    prefix_cache: bool = True
    # tokens per forward after the shared prefix: queries with their generation room are grouped up to this many
    # (scored queries with their candidates' trie: up to 512 of them, backend_hf.SCORE_GROUP_TOKENS); the naive
    # path puts this many tokens of candidates in one forward
    batch_tokens: int = Field(2048, gt=0)
    max_new_tokens: dict[str, int] = Field(default_factory=dict)  # per family; defaults in families.py


class CompareConfig(Strict):
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    task_level_steps: int | None = None  # default: training.max_steps
    # the dedicated model is the zero-shot reference; add shot counts to also prompt it with demonstrations
    task_level_shots: list[Shots] = Field(default_factory=lambda: [0])
    # training budgets, as fractions of training.max_steps, at which the mixture fine-tunes are also evaluated from
    # the checkpoint saved there (so each must be a multiple of training.save_steps); 1.0 is the final model. With the
    # learning rate constant after warm-up (training.lr_scheduler: constant_with_warmup) an earlier checkpoint is
    # what a shorter run would have made, so one run per method gives the budget curve
    budgets: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [1.0])
    budget_shots: list[Shots] = Field(default_factory=lambda: ["max"])  # held-out shots at the earlier budgets

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}")
        return v


class ExperimentConfig(Strict):
    name: str = "experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    output_dir: str = "runs/experiment"

    @property
    def evaluation_tokens(self) -> int:
        """The evaluation's context budget: evaluation.max_tokens, else the training sequence length."""
        return self.evaluation.max_tokens or self.training.max_tokens


# ---------------------------------------------------------------- loading


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` pairs; values are parsed as YAML (``3``, ``true``, ``[a, b]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ManyICLError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ManyICLError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


# keys of earlier versions, and what became of them
RETIRED_KEYS = {
    "evaluation.multiple_choice": "moved to format.multiple_choice (it decides the answer form of training and "
                                  "evaluation alike)",
    "training.balance_labels": "retired: training sequences are always in i.i.d. order (label rounds let answers be "
                               "guessed from the earlier ones); drop the key",
}


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p not in ("name", "spec") or p == first["loc"][-1])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = RETIRED_KEYS.get(where, "unknown key; check the spelling (see configs/ for every key)")
    return f"{source}: {where}: {message}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ManyICLError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ManyICLError(yaml_error(path, e)) from None
        if not isinstance(data, dict):
            raise ManyICLError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ManyICLError(_describe(e, source)) from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def drop_speed_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without the settings that change memory and speed but never results, for comparing runs."""
    data.get("training", {}).pop("release_freed_memory", None)
    return data
