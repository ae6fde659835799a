"""A batch of tables, as this rank holds its rows.

Rows are sharded as ``ctx.shard`` shards a tensor: contiguous, the first
``total % sp_size`` ranks one row more; ``ctx.sharded_dim(total, dim=1)`` says
where this rank's rows sit (and declares dim 1 sharded). Training rows come
first (global rows ``[0, train_size)``), so the split point may fall inside
any rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic import ShardedDim


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
    rows: ShardedDim

    @classmethod
    def shard(cls, x: torch.Tensor, y: torch.Tensor, train_size: int, rows: ShardedDim) -> Tables:
        """The local part of full tables (every rank holds them whole, e.g. a small real dataset)."""
        return cls(rows.take(x, 1).contiguous(), rows.take(y, 1).contiguous(), train_size, rows)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def test_rows(self) -> int:
        """Test rows per table, over all ranks."""
        return self.rows.total - self.train_size

    def test_mask(self) -> torch.Tensor:
        """``(R,)`` bool: which local rows are test rows."""
        return ~self.rows.prefix_mask(self.train_size, self.x.device)

    def to(self, device: torch.device) -> Tables:
        return Tables(self.x.to(device), self.y.to(device), self.train_size, self.rows)
