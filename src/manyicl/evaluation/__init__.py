"""Evaluation: prompts (prompting.py) -> a backend runs the model (backend.py, backend_hf.py) -> one cell's
predictions and metrics (cells.py) -> every cell into results.json (runner.py)."""

from manyicl.evaluation.backend import Backend, Stop
from manyicl.evaluation.backend_hf import NaiveBackend, SharedPrefixBackend, hf_backend
from manyicl.evaluation.cells import CellOutput, Prediction, evaluate_cell
from manyicl.evaluation.prompting import Prompter, check_shots
from manyicl.evaluation.runner import run_evaluation

__all__ = [
    "Backend", "CellOutput", "NaiveBackend", "Prediction", "Prompter", "SharedPrefixBackend", "Stop", "check_shots",
    "evaluate_cell", "hf_backend", "run_evaluation",
]
