"""Accuracy on held-out synthetic tables and on iris, next to the majority-class baseline."""

from __future__ import annotations

from dataclasses import dataclass

import mosaic

from .model import NanoTabPFN
from .objective import count_correct
from .prior import PriorConfig, draw_spec, sample
from .realdata import iris_tables
from .tables import Tables


@dataclass(frozen=True)
class Accuracy:
    """Test-row counts over a set of tables."""

    correct: float
    majority: float
    total: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def baseline(self) -> float:
        """Accuracy of predicting each table's most frequent training class."""
        return self.majority / self.total

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} (majority-class baseline {self.baseline:.3f}, {int(self.total)} test rows)"


def _accuracy(model: NanoTabPFN, batches: list[Tables], ctx: mosaic.Context, bf16: bool) -> Accuracy:
    was_training = model.training
    model.eval()
    try:
        counts = [count_correct(model, tables.to(ctx.device), ctx, bf16=bf16) for tables in batches]
    finally:
        model.train(was_training)
    return Accuracy(*(sum(c[i] for c in counts) for i in range(3)))


def synthetic_accuracy(
    model: NanoTabPFN, config: PriorConfig, ctx: mosaic.Context, *, seed: int, batches: int, bf16: bool = False
) -> Accuracy:
    """Accuracy on ``batches`` batches of tables from the prior's held-out stream (never trained on)."""
    rows = ctx.sharded_dim(config.rows, dim=1)
    tables = [sample(config, draw_spec(config, "eval", seed, i), rows, ctx.device) for i in range(batches)]
    return _accuracy(model, tables, ctx, bf16)


def iris_accuracy(
    model: NanoTabPFN, ctx: mosaic.Context, *, seed: int, repeats: int = 10, bf16: bool = False
) -> Accuracy | None:
    """Accuracy on ``repeats`` random half/half splits of iris; ``None`` without scikit-learn."""
    tables = iris_tables(ctx, repeats, seed)
    return None if tables is None else _accuracy(model, [tables], ctx, bf16)
