"""The training recipe moved to the package manyicl.training (recipe.py); kept so that ``from manyicl.train import
train``, the import path the README and users' scripts name, still works."""

from manyicl.training.recipe import TrainResult, train

__all__ = ["TrainResult", "train"]
