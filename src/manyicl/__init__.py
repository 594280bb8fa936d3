"""manyicl: many-shot in-context fine-tuning (ManyICL) — fine-tune once, solve new tasks by many-shot prompting."""

from manyicl.errors import ManyICLError

__version__ = "0.1.0"
__all__ = ["ManyICLError", "__version__"]
