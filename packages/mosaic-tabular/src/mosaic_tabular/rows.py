"""Rows of one table spread over the sp group: this rank's share, and statistics over every rank's rows.

Rows are sharded in order (train rows first, then test rows, as the packages
lay them out), contiguously, the first ``N % P`` ranks holding one more
(``ctx.sharded_dim``'s layout; a rank may hold none). This rank's training rows are then a prefix of its
rows, so the packages' ``x[:n_train]`` slicing works when given this rank's
count, and the statistics the packages compute over rows are computed here
over every rank's rows, with torch's results on the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mosaic

__all__ = ["RowSplit", "constant_along_rows", "finite_mean", "raise_if_any"]


@dataclass(frozen=True)
class RowSplit:
    """This rank's rows of a table of ``rows`` rows, the first ``train`` of them training rows."""

    rows: int
    train: int
    offset: int
    length: int

    @classmethod
    def of(cls, rows: int, train: int) -> RowSplit:
        """The split of the current Mosaic context's sp group (``mosaic.init`` first)."""
        if not 0 <= train <= rows:
            raise ValueError(f"the training rows ({train}) must be between 0 and the rows ({rows})")
        # ``ctx.sharded_dim``'s layout, also for fewer rows than ranks (which it refuses): a few test
        # rows to predict from a cache leave some ranks without rows, and they still join every call.
        ctx = mosaic.get_context()
        lengths = mosaic.SeqLayout.even(rows, ctx.sp_size).lengths
        return cls(rows, train, sum(lengths[: ctx.sp_rank]), lengths[ctx.sp_rank])

    @property
    def local_train(self) -> int:
        """How many of this rank's rows are training rows (a prefix of them)."""
        return max(0, min(self.train - self.offset, self.length))

    @property
    def train_slice(self) -> slice:
        """This rank's training rows as positions of the training rows (of ``y_train``)."""
        start = min(self.offset, self.train)
        return slice(start, start + self.local_train)

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's rows of ``x``, which holds every row along ``dim``."""
        if x.shape[dim] != self.rows:
            raise ValueError(f"expected {self.rows} rows along dim {dim}, got {x.shape[dim]}")
        return x.narrow(dim, self.offset, self.length)

    def take_train(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's training rows of ``y``, which holds every training row along ``dim``."""
        if y.shape[dim] != self.train:
            raise ValueError(f"expected {self.train} training rows along dim {dim}, got {y.shape[dim]}")
        return y.narrow(dim, self.train_slice.start, self.local_train)


def finite_mean(x: torch.Tensor, n_train: int) -> torch.Tensor:
    """The mean over every rank's first ``n_train`` rows (dim 0) of the finite entries; 0 where none is.

    tabpfn's ``torch_nanmean(x[:n], axis=0, include_inf=True)`` on the whole table.
    """
    train = x[:n_train]
    finite = train.isfinite()
    total = mosaic.sharded.sum(torch.where(finite, train, torch.zeros_like(train)), 0)
    count = mosaic.sharded.count(train, 0, mask=finite)
    return total / count.clamp(min=1).to(x.dtype)


def constant_along_rows(x: torch.Tensor) -> torch.Tensor:
    """Where every rank's rows (dim 0) equal the table's first row, as ``(x[1:] == x[0]).all(0)`` says.

    A NaN equals nothing, so any NaN makes an entry non-constant; otherwise an
    entry is constant when its smallest and largest value agree. A rank without
    rows contributes a row that cannot be the extreme (``+inf`` to the min,
    ``-inf`` to the max), since a reduction over no rows has no value.
    """
    nan = x.isnan()
    any_nan = mosaic.sharded.count(x, 0, mask=nan) > 0
    values = torch.where(nan, torch.zeros_like(x), x)
    inf = values.new_full((1, *values.shape[1:]), float("inf"))
    low = mosaic.sharded.min(torch.cat([values, inf]), 0)
    high = mosaic.sharded.max(torch.cat([values, -inf]), 0)
    return ~any_nan & (low == high)


def raise_if_any(bad: bool, error: Exception) -> None:
    """Raise ``error`` on every rank when ``bad`` holds on any rank (a check of this rank's rows)."""
    if mosaic.sharded.agree(bool(bad), "any"):
        raise error
