"""The methods of the paper's comparison, in report order: the one list config, compare and report share.

Every fine-tuned method is a training objective (sequences.OBJECTIVES) on the shared meta-train mixture, except
``task_level``: one dedicated fine-tune per held-out task, on that task alone (the upper reference).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    objective: str | None  # None: not fine-tuned on the mixture (base prompts the untuned model)
    description: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("base", None, "the untuned model, prompted with the same demonstrations"),
    Method("zero_shot_ft", "zero_shot", "multi-task fine-tune, query only"),
    Method("few_shot_ft", "few_shot", "n demonstrations + query, loss on the last answer"),
    Method("many_shot_last_ft", "many_shot_last", "many-shot sequences, loss on the last answer"),
    Method("manyicl", "many_shot_all", "many-shot sequences, loss on every answer (ManyICL)"),
    Method("task_level", "zero_shot", "one fine-tune per held-out task, on that task alone"),
]}
MIXTURE_METHODS = tuple(name for name, m in METHODS.items() if m.objective and name != "task_level")
