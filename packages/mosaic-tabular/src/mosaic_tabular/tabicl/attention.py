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

The K/V caches: the ICL transformer's cache holds the keys/values of the
training rows, so each rank caches its own training rows (``need_kv``) and its
test rows later attend to every rank's cached rows (``cached_kv``). The induced
blocks cache the keys/values of the inducing points' result, which every rank
holds whole: the package's second attention builds and reads that cache as it is
(:class:`RowLocalMultiheadAttention`, which only adds the case of a rank without rows).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabicl._model.kv_cache import KVCache, KVCacheEntry
from tabicl._model.layers import InducedSelfAttentionBlock, MultiheadAttention

import mosaic

from ..attention import row_attention

__all__ = [
    "Queries",
    "RowLocalMultiheadAttention",
    "RowShardedInducedSelfAttentionBlock",
    "RowShardedMultiheadAttention",
]

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
        """tabicl's forward, ``key``/``value``/``cached_kv`` this rank's rows; ``need_kv`` returns this rank's K/V."""
        unsupported = [n for n, v in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask),
                                      ("rope", rope)) if v is not None]  # fmt: skip
        if self.mosaic_queries == "replicated" and (cached_kv is not None or need_kv):
            unsupported.append("a K/V cache of the inducing points' attention")
        if unsupported:
            # Decided by the model's configuration and call, the same on every rank.
            raise NotImplementedError(
                f"mosaic-tabular 0.1 does not shard TabICL's attention over rows with {', '.join(unsupported)}"
            )
        *batch, tgt, e = query.shape
        h, d = self.num_heads, e // self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        heads = lambda t: t.reshape(math.prod(batch), t.shape[-2], h, d).transpose(1, 2)
        project = lambda x, i: F.linear(x, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
        q = heads(project(query, 0))
        if cached_kv is None:
            k, v = heads(project(key, 1)), heads(project(value, 2))
        else:  # (*batch, heads, this rank's cached rows, head_dim), as the package caches them
            k, v = (t.reshape(math.prod(batch), h, t.shape[-2], d) for t in (cached_kv.key, cached_kv.value))
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
        out = self.out_proj(out.transpose(1, 2).reshape(*batch, tgt, e))
        if need_kv and cached_kv is None:
            return out, k.unflatten(0, batch), v.unflatten(0, batch)
        return out


class RowLocalMultiheadAttention(MultiheadAttention):
    """tabicl's ``MultiheadAttention`` from this rank's rows to keys every rank holds whole (made by class swap).

    The induced blocks' second attention: this rank's rows attend to the inducing
    points' result. It is the package's, except on a rank without rows, where the
    package's attention cannot flatten an empty batch of queries: there it attends
    one row of zeros and returns no row (with the K/V of the keys, for a cache).
    """

    def forward(self, query: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if query.shape[-2] > 0:
            return super().forward(query, *args, **kwargs)
        result = super().forward(query.new_zeros(*query.shape[:-2], 1, query.shape[-1]), *args, **kwargs)
        if isinstance(result, tuple):
            return (result[0][..., :0, :], *result[1:])
        return result[..., :0, :]


class RowShardedInducedSelfAttentionBlock(InducedSelfAttentionBlock):
    """tabicl's ``InducedSelfAttentionBlock`` with the skip decision over every rank's rows (made by class swap)."""

    def skipped(self, src: torch.Tensor) -> torch.Tensor:
        """Which columns (batch entries) hold ``skip_value`` in every row of every rank; the same on every rank."""
        skip_row = (src == self.skip_value).all(dim=-1)
        return mosaic.sharded.count(skip_row, -1, mask=~skip_row) == 0

    def forward(self, src: torch.Tensor, train_size: int | None = None) -> torch.Tensor:
        skip = self.skipped(src)
        if not skip.any():
            return self.induced_attention(src, train_size)
        if skip.all():
            return torch.full_like(src, self.skip_value)
        out = torch.empty_like(src)
        out[~skip] = self.induced_attention(src[~skip], train_size)
        out[skip] = self.skip_value
        return out

    def forward_with_cache(self, src: torch.Tensor, col_cache: KVCache, block_idx: int, train_size: int | None = None,
                           use_cache: bool = False, store_cache: bool = True) -> torch.Tensor:  # fmt: skip
        """The package's cached forward, with the skip decision over every rank's rows.

        The package keeps every column in the cached attention (the cache holds the
        whole batch) and writes the skip value into the skipped ones after.
        """
        if use_cache == store_cache:
            raise ValueError("Exactly one of use_cache or store_cache must be True")
        if store_cache and train_size is None:
            raise ValueError("train_size must be provided when store_cache=True")
        skip = self.skipped(src)
        if skip.all():
            return torch.full_like(src, self.skip_value)
        out = self.induced_attention_with_cache(src, col_cache, block_idx, train_size, use_cache, store_cache)
        if skip.any():
            out[skip] = self.skip_value
        return out
