"""TabICL (tabicl 2.2.0) with its rows sharded over the sp group, through Mosaic's public API.

Two of TabICL's components attend over rows:

- the ICL transformer (``ICLearning.tf_icl``, an ``Encoder`` of
  ``MultiheadAttentionBlock``): every row's query attends to the training rows;
- the induced self-attention blocks of the column embedding
  (``InducedSelfAttentionBlock``): learned inducing points attend to the
  training rows (``multihead_attn1``), then every row attends to the inducing
  points' result (``multihead_attn2``).

Both use scalable softmax by default (``"qassmax-mlp-elementwise"``): between
projection and attention, q is scaled by a function of ``log n``, ``n`` the
number of keys. With rows sharded, ``n`` must be the global key count
(``mosaic.sharded.total``), never the local ``k.size(-2)``.

:class:`RowShardedMultiheadAttention` subclasses tabicl's ``MultiheadAttention``
(same parameters and names, the package's own SSMax module) and replaces its
forward with ``mosaic.attention``. The blocks' and ``ICLearning``'s forwards
run unchanged when given this rank's training-row count as ``train_size``
(rows are sharded in order, so this rank's training rows are a prefix of its
rows, ``ShardedDim.prefix_count``) and this rank's training labels as
``y_train``: they slice ``[..., :train_size, :]``, which is then this rank's
part of the keys. ``multihead_attn2`` attends to inducing points that every
rank holds whole, so it stays the package's module. ``InducedSelfAttentionBlock``
decides from the rows whether a column is skipped (all values equal
``skip_value``); :class:`RowShardedInducedSelfAttentionBlock` takes that
decision over every rank's rows.

tabicl 2.2.0 keeps these modules under ``tabicl._model`` (its docstring: users
should not import it), the only place they exist.
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

Queries = Literal["sharded", "replicated"]


class RowShardedMultiheadAttention(MultiheadAttention):
    """tabicl's ``MultiheadAttention`` whose keys/values are this rank's rows of a dim sharded over the sp group.

    Args:
        embed_dim, num_heads, dropout, ssmax: as for tabicl's ``MultiheadAttention``.
        backend: the Mosaic strategy over the keys' rows (a distributed one).
        queries: ``"sharded"``: the queries are this rank's rows too (the ICL transformer);
            ``"replicated"``: every rank holds every query (inducing points). Then each rank
            attends its share of the queries and the results are gathered (``ctx.unshard``,
            differentiable), so the attention's work is split too; needs at least as many
            queries as ranks.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, ssmax: bool | str = False, *,
                 backend: str = "allgather", queries: Queries = "sharded"):  # fmt: skip
        super().__init__(embed_dim, num_heads, dropout, ssmax)
        if queries not in ("sharded", "replicated"):
            raise ValueError(f"queries must be 'sharded' or 'replicated', got {queries!r}")
        self.backend, self.queries = backend, queries

    @classmethod
    def from_module(cls, attn: MultiheadAttention, backend: str, queries: Queries) -> RowShardedMultiheadAttention:
        """The row-sharded twin of ``attn``: its weights and its own scalable-softmax module."""
        p = attn.in_proj_weight
        new = cls(attn.embed_dim, attn.num_heads, attn.dropout, backend=backend, queries=queries).to(p.device, p.dtype)
        new.ssmax_layer = attn.ssmax_layer
        new.load_state_dict(attn.state_dict())
        return new

    def key_count(self, local: int) -> int:
        """The number of keys the scalable softmax sees: every rank's, not this rank's."""
        return mosaic.sharded.total(local)

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
        """tabicl's forward (same arguments and results) with ``key``/``value``/``cached_kv`` this rank's rows."""
        unsupported = [n for n, v in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask),
                                      ("rope", rope)) if v is not None]  # fmt: skip
        if unsupported:
            # A mask or RoPE over sharded rows would need every rank's positions: not needed by TabICL's row dims.
            raise ValueError(f"{type(self).__name__} does not take {', '.join(unsupported)}")
        *batch, tgt, e = query.shape
        h, d = self.num_heads, e // self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        heads = lambda t: t.reshape(math.prod(batch), t.shape[-2], h, d).transpose(1, 2)
        project = lambda x, i: F.linear(x, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
        q = heads(project(query, 0))
        if cached_kv is None:
            k, v = heads(project(key, 1)), heads(project(value, 2))
        else:
            k, v = (t.reshape(math.prod(batch), h, -1, d) for t in (cached_kv.key, cached_kv.value))
        if self.ssmax_layer is not None:
            q = self.ssmax_layer(q, self.key_count(k.shape[-2]))
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).reshape(*batch, tgt, e)
        out = self.out_proj(out)
        if need_kv and cached_kv is None:
            return out, k.unflatten(0, batch), v.unflatten(0, batch)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.queries == "sharded":
            return mosaic.attention(q, k, v, backend=self.backend, dropout=dropout, sharded=True,
                                    name="TabICL attention over rows")  # fmt: skip
        ctx = mosaic.get_context()
        mine = ctx.sharded_dim(q.shape[2])  # this rank's share of the queries (no dim is declared)
        out = mosaic.attention(mine.take(q, 2), k, v, backend=self.backend, dropout=dropout, sharded=True,
                               name="TabICL inducing points -> rows")  # fmt: skip
        return ctx.unshard(out, 2)


def shard_icl_rows(encoder: nn.Module, backend: str = "allgather") -> nn.Module:
    """Make every block of an ``Encoder`` over rows (``ICLearning.tf_icl``) attend over sharded rows, in place."""
    for block in encoder.blocks:
        block.attn = RowShardedMultiheadAttention.from_module(block.attn, backend, "sharded")
    return encoder


class RowShardedInducedSelfAttentionBlock(InducedSelfAttentionBlock):
    """tabicl's ``InducedSelfAttentionBlock`` over rows sharded in order over the sp group.

    Args:
        *args, **kwargs: as for ``InducedSelfAttentionBlock`` (build it from the same
            configuration as the unsharded block, then load that block's ``state_dict``).
        backend: the Mosaic strategy over rows for the inducing points' attention.

    ``train_size`` in :meth:`forward` and :meth:`forward_with_cache` is this rank's count
    of training rows; ``num_inds`` must be at least the sp group's size.
    """

    def __init__(self, *args, backend: str = "allgather", **kwargs):
        super().__init__(*args, **kwargs)
        first = self.multihead_attn1
        first.attn = RowShardedMultiheadAttention.from_module(first.attn, backend, "replicated")

    def skipped(self, src: torch.Tensor) -> torch.Tensor:
        """Which columns (batch entries) hold ``skip_value`` in every row of every rank; the same on every rank."""
        skip_row = (src == self.skip_value).all(dim=-1)
        return mosaic.sharded.count(skip_row, -1, mask=~skip_row) == 0

    def forward(self, src: torch.Tensor, train_size: int | None = None) -> torch.Tensor:
        """The package's forward, with the skip decision taken over every rank's rows."""
        skip = self.skipped(src)
        if not skip.any():
            return self.induced_attention(src, train_size)
        if skip.all():
            return torch.full_like(src, self.skip_value)
        out = torch.empty_like(src)
        out[~skip] = self.induced_attention(src[~skip], train_size)
        out[skip] = self.skip_value
        return out

    def forward_with_cache(self, src: torch.Tensor, col_cache, block_idx: int, train_size: int | None = None,
                           use_cache: bool = False, store_cache: bool = True) -> torch.Tensor:  # fmt: skip
        """The package's cached forward, with the skip decision taken over every rank's rows.

        The cache holds ``multihead_attn2``'s keys/values, projected from the inducing
        points' result: whole on every rank, so the package's code builds and reads it.
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
