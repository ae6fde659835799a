"""TabICL's row interaction on a rank of the sp group that holds no rows.

The row interaction attends between the features of each row, with the rows
folded into the batch: nothing crosses ranks, and it runs as it is. On a rank
without rows (fewer rows than ranks, a cache's test rows spread thin) the
package's attention cannot flatten the empty batch, so it runs one row of zeros
and returns no row.
"""

from __future__ import annotations

import torch
from tabicl._model.interaction import RowInteraction

__all__ = ["RowShardedRowInteraction"]


class RowShardedRowInteraction(RowInteraction):
    """tabicl's ``RowInteraction`` that also runs on no rows (made by class swap)."""

    def _aggregate_embeddings(self, embeddings: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings.shape[1] > 0:
            return super()._aggregate_embeddings(embeddings, key_mask)
        one = embeddings.new_zeros(embeddings.shape[0], 1, *embeddings.shape[2:])
        mask = None if key_mask is None else key_mask.new_zeros(key_mask.shape[0], 1, *key_mask.shape[2:])
        return super()._aggregate_embeddings(one, mask)[:, :0]
