"""TabPFN (tabpfn 9.2) with its rows sharded over the sp group: the model and the estimators."""

from __future__ import annotations

from .checkpoint import build_random_tabpfn, make_random_checkpoint
from .estimators import TabPFNClassifier, TabPFNRegressor
from .model import COVERED, NOT_COVERED, shard_tabpfn

__all__ = [
    "COVERED",
    "NOT_COVERED",
    "TabPFNClassifier",
    "TabPFNRegressor",
    "build_random_tabpfn",
    "make_random_checkpoint",
    "shard_tabpfn",
]
