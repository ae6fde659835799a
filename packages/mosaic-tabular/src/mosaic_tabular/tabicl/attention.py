"""TabICL's attention over rows, on rows sharded over the sp group.

Two of TabICL's components attend over rows: the ICL transformer (every
row's query over the training rows) and the induced self-attention blocks of
the column embedder (learned inducing points over the training rows). Both
use tabicl's ``MultiheadAttention``, whose scalable softmax (SSMax/QASSMax)
scales q by a function of the key count: with rows sharded that is the
global count. :class:`RowShardedMultiheadAttention` is tabicl's module (same
parameters, its own softmax-scaling module) with a forward over sharded keys;
:class:`RowShardedInducedSelfAttentionBlock` takes the block's skip decision
(a column whose every row holds ``skip_value``) over every rank's rows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabicl._model.kv_cache import KVCacheEntry
from tabicl._model.layers import InducedSelfAttentionBlock, MultiheadAttention

import mosaic

from ..attention import row_attention

__all__ = ["Queries", "RowShardedInducedSelfAttentionBlock", "RowShardedMultiheadAttention"]

Queries = Literal["sharded", "replicated"]


class RowShardedMultiheadAttention(MultiheadAttention):
    """tabicl's ``MultiheadAttention`` whose keys/values are this rank's rows of the sp group's rows.

    Made by class swap of an existing module (``mosaic_backend`` and ``mosaic_queries`` set
    after): ``"sharded"`` queries are this rank's rows too (the ICL transformer);
    ``"replicated"`` ones are the same on every rank (inducing points), and each rank
    attends its share of them, the results gathered.
    """

    mosaic_backend: str = "auto"
    mosaic_queries: Queries = "sharded"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        cached_kv: KVCacheEntry | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rope: nn.Module | None = None,
        need_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unsupported = [n for n, v in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask),
                                      ("rope", rope), ("cached_kv", cached_kv)) if v is not None]  # fmt: skip
        if unsupported or need_kv:
            # Decided by the model's configuration and call, the same on every rank.
            raise NotImplementedError(
                f"mosaic-tabular 0.1 does not shard TabICL's attention over rows with "
                f"{', '.join(unsupported + ['need_kv'] * need_kv)} (TabICL's K/V caches, RoPE over rows)"
            )
        *batch, tgt, e = query.shape
        h, d = self.num_heads, e // self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        heads = lambda t: t.reshape(math.prod(batch), t.shape[-2], h, d).transpose(1, 2)
        project = lambda x, i: F.linear(x, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
        q, k, v = heads(project(query, 0)), heads(project(key, 1)), heads(project(value, 2))
        if self.ssmax_layer is not None:
            q = self.ssmax_layer(q, mosaic.sharded.total(k.shape[-2]))  # the global key count
        if self.mosaic_queries == "sharded":
            out = row_attention(q, k, v, backend=self.mosaic_backend, name="TabICL attention over rows")
        else:
            ctx = mosaic.get_context()
            mine = ctx.sharded_dim(q.shape[2])  # this rank's share of the queries (no dim declared)
            out = row_attention(mine.take(q, 2), k, v, backend=self.mosaic_backend,
                                name="TabICL inducing points -> rows")  # fmt: skip
            out = ctx.unshard(out, 2)
        return self.out_proj(out.transpose(1, 2).reshape(*batch, tgt, e))


class RowShardedInducedSelfAttentionBlock(InducedSelfAttentionBlock):
    """tabicl's ``InducedSelfAttentionBlock`` with the skip decision over every rank's rows (made by class swap)."""

    def forward(self, src: torch.Tensor, train_size: int | None = None) -> torch.Tensor:
        skip_row = (src == self.skip_value).all(dim=-1)
        skip = mosaic.sharded.count(skip_row, -1, mask=~skip_row) == 0  # the same on every rank
        if not skip.any():
            return self.induced_attention(src, train_size)
        if skip.all():
            return torch.full_like(src, self.skip_value)
        out = torch.empty_like(src)
        out[~skip] = self.induced_attention(src[~skip], train_size)
        out[skip] = self.skip_value
        return out

    def forward_with_cache(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError("mosaic-tabular 0.1 does not shard TabICL's column-embedding cache")
