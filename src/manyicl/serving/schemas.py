"""Every request and response body of the server, as pydantic models (they are the OpenAPI schema at /docs), and
the limits a request is checked against before it reaches the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from manyicl.families import FAMILIES, SCORINGS
from manyicl.predict import DEFAULTS

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a name never reaches the filesystem; this keeps it printable


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``manyicl serve --help`` names the options; docs/SERVING.md the defaults)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_demonstrations: int = 4096
    max_input_chars: int = 8000
    max_inputs: int = 256  # per predict request
    max_queue: int = 64  # requests waiting for the model worker; beyond it: 429


class Demonstration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    choices: list[str] = Field(default_factory=list, description="multiple choice: the option texts in letter order")


class TaskSpec(BaseModel):
    """A task as registered: what decides its prompt. Stored as given; re-registering a name replaces it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=TASK_NAME)
    family: Literal[tuple(FAMILIES)] = "classification"  # type: ignore[valid-type]
    labels: Optional[list[str]] = Field(None, description="label-set families: the labels (default: the answers)")
    demonstrations: Optional[list[Demonstration]] = None
    demonstrations_jsonl: Optional[str] = Field(None, description="the same, as JSONL text (one object per line)")
    shots: Union[int, Literal["max"]] = Field("max", description="a number of demonstrations, or max: all that fit")
    seed: int = 0
    scoring: Literal[SCORINGS] = DEFAULTS.scoring  # type: ignore[valid-type]
    balance_labels: bool = DEFAULTS.balance_labels
    instruction: str = ""
    max_tokens: Optional[int] = Field(None, ge=64, description="context budget (default: the server's --max-tokens)")
    query_tokens: int = Field(256, ge=1, description="room kept after the demonstrations for one input and its "
                                                     "answer (manyicl predict --reserve-tokens)")

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSpec":
        if (self.demonstrations is None) == (self.demonstrations_jsonl is None):
            raise ValueError("give either demonstrations (a list) or demonstrations_jsonl (JSONL text), not both")
        if isinstance(self.shots, int) and self.shots < 0:
            raise ValueError("shots: a number >= 0 or max")
        return self


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    choices: list[str] = Field(default_factory=list)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Union[str, Query]] = Field(min_length=1)


class Answer(BaseModel):
    input: str
    prediction: Optional[str]
    probabilities: Optional[dict[str, float]] = Field(None, description="ranked families: every label's probability "
                                                                        "under the task's scoring")
    skipped: Optional[str] = None


class PredictResponse(BaseModel):
    task: str
    predictions: list[Answer]
    prefix_tokens: int
    cache: Literal["hit", "miss"]
    seconds: float


class CacheState(BaseModel):
    resident: bool
    bytes: int


class TaskSummary(BaseModel):
    name: str
    family: str
    labels: Optional[list[str]]
    shots_requested: Union[int, str]
    shots: int
    seed: int
    scoring: str
    max_tokens: int
    prefix_tokens: int
    label_histogram: dict[str, int]
    cache: CacheState
    registered_at: float


class TaskDetail(TaskSummary):
    instruction: str
    query_tokens: int
    demonstrations: list[Demonstration] = Field(description="the demonstrations in the prompt, in prompt order")


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    tasks: int


class Problem(BaseModel):
    error: str
