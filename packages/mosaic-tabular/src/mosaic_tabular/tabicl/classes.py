"""The number of classes of TabICL's training labels, counted over every rank's rows.

tabicl counts classes in two ways, both from the labels it is given: the column
embedder takes the largest label + 1 (``y_train.max()``), the ICL predictor and
the cache the distinct labels of the first table (``len(torch.unique(y_train[0]))``).
On sharded rows each rank holds some of the labels, or none; these give the
counts of the whole table, the same on every rank.
"""

from __future__ import annotations

import torch

import mosaic

__all__ = ["distinct_classes", "largest_class_plus_one"]


def largest_class_plus_one(y_train: torch.Tensor) -> int:
    """``int(y_train.max()) + 1`` over every rank's labels (0 for no label anywhere)."""
    local = int(y_train.max().item()) + 1 if y_train.numel() else 0
    return mosaic.sharded.agree(local, "max")


def distinct_classes(y_table: torch.Tensor) -> int:
    """``len(torch.unique(y_table))`` over every rank's labels of one table."""
    return len(mosaic.sharded.unique(y_table))
