"""The one place this package calls ``mosaic.attention`` over rows.

The row tensors handed to attention here (a layer's projected q/k/v, a K/V
cache of the training rows each rank holds) are this rank's rows of the sp
group, but no dim of theirs was declared with ``ctx.shard``/``ctx.sharded_dim``:
they are views the packages' own code made, so the call says so with
``sharded=True`` (the keys are this rank's rows of a dim sharded over the sp
group; the lengths may differ between ranks and be 0).
"""

from __future__ import annotations

import torch

import mosaic

__all__ = ["row_attention"]


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, name: str) -> torch.Tensor:
    """Attention of this rank's query rows over every rank's key rows (``(batch, heads, rows, head_dim)``)."""
    return mosaic.attention(q, k, v, backend=backend, name=name, sharded=True)
