"""Training: one fine-tune over a mixture of tasks (docs/TRAINING.md).

- ``recipe.py``: ``train(config)``, the recipe read top to bottom
- ``trainer.py``: the ``transformers.Trainer`` subclass with the target-only loss, and train_log.jsonl
- ``mixture.py``: one sequence builder per task, the mixture over tasks, the lazy dataset, ``collate``
- ``loss.py``: the target-only loss (the LM head only where an answer token is predicted)
- ``packing.py``: packed zero-/few-shot units isolated by construction
- ``precision.py``: ``training.precision: auto | fp32 | bf16``
- ``checkpoints.py``: the config hash, complete checkpoints, what may be resumed
- ``memory.py``: CPU: freed activations returned to the OS, during training only

Importing this package loads none of them: ``from manyicl.training import train`` loads the recipe (and
transformers' Trainer) on first use, so that ``manyicl.training.checkpoints`` or ``.precision`` stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from manyicl.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
