"""The methods of the paper's comparison, in report order: the one list config, compare and report share.

Each row says how the method is trained and what it is in the comparison, so that compare and the report hold no
method names: ``none`` (the untuned model, prompted), ``mixture`` (one fine-tune over the meta-train mixture with a
training objective of sequences.OBJECTIVES) or ``per_task`` (one dedicated fine-tune per held-out task); the
``subject`` (ManyICL), the ``baseline``s it is compared against, and the ``reference`` (the dedicated model whose
gap to the untuned model ManyICL should close).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    objective: str | None  # None: not fine-tuned (base prompts the untuned model)
    training: Literal["none", "mixture", "per_task"]
    role: Literal["subject", "baseline", "reference"]
    description: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("base", None, "none", "baseline", "the untuned model, prompted with the same demonstrations"),
    Method("zero_shot_ft", "zero_shot", "mixture", "baseline", "multi-task fine-tune, query only"),
    Method("few_shot_ft", "few_shot", "mixture", "baseline", "n demonstrations + query, loss on the last answer"),
    Method("many_shot_last_ft", "many_shot_last", "mixture", "baseline",
           "many-shot sequences, loss on the last answer"),
    Method("manyicl", "many_shot_all", "mixture", "subject", "many-shot sequences, loss on every answer (ManyICL)"),
    Method("task_level", "zero_shot", "per_task", "reference", "one fine-tune per held-out task, on that task alone"),
]}
MIXTURE_METHODS = tuple(name for name, m in METHODS.items() if m.training == "mixture")
SUBJECT = next(name for name, m in METHODS.items() if m.role == "subject")  # what the comparison is about
UNTUNED = next(name for name, m in METHODS.items() if m.training == "none")  # the model as it is: forgetting's zero
REFERENCE = next(name for name, m in METHODS.items() if m.role == "reference")  # the dedicated fine-tune
