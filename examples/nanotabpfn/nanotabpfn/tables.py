"""A batch of tables, and which of its rows this rank holds.

Rows are sharded as ``ctx.shard`` shards a tensor: contiguous, the first
``total % sp_size`` ranks one row more. Training rows come first (global rows
``[0, train_size)``), so the split point may fall inside any rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import mosaic


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows sit: global rows ``[offset, offset + length)`` of ``total``.

    ``group`` is the process group the rows are sharded over (``None``: the
    rank holds every row).
    """

    offset: int
    length: int
    total: int
    group: dist.ProcessGroup | None = None

    @property
    def stop(self) -> int:
        return self.offset + self.length

    @classmethod
    def whole(cls, total: int) -> RowShard:
        return cls(0, total, total)

    @classmethod
    def of(cls, ctx: mosaic.Context, total: int) -> RowShard:
        """This rank's rows when ``ctx.shard`` splits ``total`` rows over the sp group."""
        if total < ctx.sp_size:
            raise ValueError(f"{total} rows cannot be sharded over {ctx.sp_size} ranks: every rank needs a row")
        ((start, stop),) = ctx.layout(total).spans(ctx.sp_rank)
        return cls(start, stop - start, total, ctx.sp_group if ctx.sp_size > 1 else None)

    def train_mask(self, train_size: int, device: torch.device) -> torch.Tensor:
        """``(length,)`` bool: which local rows are training rows (global index below ``train_size``)."""
        return torch.arange(self.offset, self.stop, device=device) < train_size

    def take(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's rows of a tensor that holds all ``total`` rows along ``dim``."""
        if full.shape[dim] != self.total:
            raise ValueError(f"expected {self.total} rows along dim {dim}, got {full.shape[dim]}")
        return full.narrow(dim, self.offset, self.length)


@dataclass(frozen=True)
class Tables:
    """``B`` classification tables of one shape, as this rank holds them.

    Args:
        x: ``(B, R, F)`` float features of the local rows.
        y: ``(B, R)`` int64 class labels of the local rows (test rows' labels are the targets).
        train_size: global rows ``[0, train_size)`` are training rows.
        rows: where the local rows sit.
    """

    x: torch.Tensor
    y: torch.Tensor
    train_size: int
    rows: RowShard

    @classmethod
    def shard(cls, x: torch.Tensor, y: torch.Tensor, train_size: int, rows: RowShard) -> Tables:
        """The local part of full tables (every rank holds them whole, e.g. a small real dataset)."""
        return cls(rows.take(x).contiguous(), rows.take(y).contiguous(), train_size, rows)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def test_rows(self) -> int:
        """Test rows per table, over all ranks."""
        return self.rows.total - self.train_size

    def test_mask(self) -> torch.Tensor:
        """``(R,)`` bool: which local rows are test rows."""
        return ~self.rows.train_mask(self.train_size, self.x.device)

    def to(self, device: torch.device) -> Tables:
        return Tables(self.x.to(device), self.y.to(device), self.train_size, self.rows)
