"""TabICL (tabicl 2.2) with its rows sharded over the sp group: the model and the estimators."""

from __future__ import annotations

from .checkpoint import build_random_tabicl, make_random_checkpoint
from .estimators import TabICLClassifier, TabICLRegressor
from .model import shard_tabicl

__all__ = ["TabICLClassifier", "TabICLRegressor", "build_random_tabicl", "make_random_checkpoint", "shard_tabicl"]
