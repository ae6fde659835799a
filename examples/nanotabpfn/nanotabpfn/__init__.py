"""nanoTabPFN on Mosaic: the model, its synthetic prior and the sharded training objective."""

from __future__ import annotations

from .model import NanoTabPFN
from .objective import compute_gradients, count_correct, local_loss
from .prior import PriorConfig, draw_spec, sample
from .tables import Tables

__all__ = [
    "NanoTabPFN",
    "PriorConfig",
    "Tables",
    "compute_gradients",
    "count_correct",
    "draw_spec",
    "local_loss",
    "sample",
]
