"""TabPFN's attention between the cells of a column (over rows), through tabpfn's attention-backend registry.

tabpfn 9.2 sends every attention call through
``tabpfn.architectures.shared.scaled_dot_product_attention``, which offers it to
the backends registered with ``register_attention_backend``. A backend sees
the call's shapes (an ``AttentionSpec``), not which layer makes it, and the
attention between features must stay local; so :class:`MosaicRowAttention`
takes exactly the calls made inside a row-attention scope, which only the
row-attention module opens, and hands them to a Mosaic strategy over the sp group.

The row-attention module is the package's ``AlongColumnAttention`` (same
projections and parameter names) with one forward that fits sharded rows:
its two calls — training rows with every kv head, test rows with kv head 0
(tabpfn's multi-query test path) — are made on every rank, also on a rank
that holds no test rows (the package then makes one call) or no training rows
(where the package's ``view(..., -1, head_dim)`` of no rows fails): every
rank must join every sharded call.

The attention between the features of a row (``AlongRowAttention``) is local
and stays the package's, except on a rank without rows (fewer rows than
ranks: a cache built from few training rows, a few test rows to predict),
where its reshape of an empty batch fails: :class:`RowsLocalFeatureAttentionV2p6`
and its twins return no rows there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from tabpfn.architectures import tabpfn_v2, tabpfn_v2_5, tabpfn_v2_6
from tabpfn.architectures.kv_cache import KVCacheEntry
from tabpfn.architectures.shared.attention_backends import AttentionSpec, register_attention_backend
from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention

from ..attention import row_attention

__all__ = [
    "ROW_ATTENTION",
    "MosaicRowAttention",
    "RowShardedColumnAttentionV2",
    "RowShardedColumnAttentionV2p5",
    "RowShardedColumnAttentionV2p6",
    "RowsLocalFeatureAttentionV2",
    "RowsLocalFeatureAttentionV2p5",
    "RowsLocalFeatureAttentionV2p6",
]

_BACKEND: ContextVar[str | None] = ContextVar("mosaic_tabular_row_attention", default=None)


class MosaicRowAttention:
    """A tabpfn attention backend: the calls of a row-attention scope, over rows sharded on the sp group."""

    name = "mosaic_rows"

    def is_preferred(self, spec: AttentionSpec) -> bool:
        return _BACKEND.get() is not None

    def run(self, q_BSHD: torch.Tensor, k_BSJD: torch.Tensor, v_BSJD: torch.Tensor, **kwargs) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSJD, v_BSJD))
        # The name is the guard's site of the call: the same on every rank for the same call.
        what = "test rows -> training rows, kv head 0" if k.shape[1] < q.shape[1] else "rows -> training rows"
        out = row_attention(q, k, v, backend=_BACKEND.get(), name=f"TabPFN attention between cells ({what})")
        return out.transpose(1, 2)


ROW_ATTENTION = MosaicRowAttention()


@contextlib.contextmanager
def _rows_through_mosaic(backend: str) -> Iterator[None]:
    register_attention_backend(ROW_ATTENTION)  # re-entrant: a no-op once registered
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


class _RowShardedColumnAttention:
    """``AlongColumnAttention.forward`` on this rank's rows; ``single_eval_pos`` counts its training rows."""

    mosaic_backend: str = "auto"

    def forward(
        self,
        x_BcRE: torch.Tensor,
        single_eval_pos: int | None = None,
        *,
        cached_kv: KVCacheEntry | None = None,
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, KVCacheEntry | None]:
        bc, r, _ = x_BcRE.shape
        heads = lambda t, rows: t.view(bc, rows, -1 if rows else self.num_heads, self.head_dim)
        q = heads(self.q_projection(x_BcRE), r)
        kv_entry = None
        with _rows_through_mosaic(self.mosaic_backend):
            if cached_kv is not None:
                # Every row is a test row: kv head 0 of every rank's cached training rows.
                k, v = cached_kv.key.to(q.dtype), cached_kv.value.to(q.dtype)
                out = scaled_dot_product_attention(q, k, v)
            else:
                n = r if single_eval_pos is None else single_eval_pos
                k = heads(self.k_projection(x_BcRE[:, :n]), n)
                v = heads(self.v_projection(x_BcRE[:, :n]), n)
                train = scaled_dot_product_attention(q[:, :n], k, v)
                test = scaled_dot_product_attention(q[:, n:], k[:, :, :1], v[:, :, :1])
                out = torch.cat([train, test], dim=1)
                if return_kv:
                    kv_entry = KVCacheEntry(key=k[:, :, :1].contiguous().detach(),
                                            value=v[:, :, :1].contiguous().detach())  # fmt: skip
        return self.out_projection(out.reshape(bc, r, self.head_dim * self.num_heads)), kv_entry


class RowShardedColumnAttentionV2(_RowShardedColumnAttention, tabpfn_v2.AlongColumnAttention):
    """RowShardedColumnAttention over tabpfn's tabpfn_v2.AlongColumnAttention."""


class RowShardedColumnAttentionV2p5(_RowShardedColumnAttention, tabpfn_v2_5.AlongColumnAttention):
    """RowShardedColumnAttention over tabpfn's tabpfn_v2_5.AlongColumnAttention."""


class RowShardedColumnAttentionV2p6(_RowShardedColumnAttention, tabpfn_v2_6.AlongColumnAttention):
    """RowShardedColumnAttention over tabpfn's tabpfn_v2_6.AlongColumnAttention."""


class _RowsLocalFeatureAttention:
    """``AlongRowAttention.forward`` (rows folded into the batch) that also takes no rows."""

    def forward(self, x_BrSE: torch.Tensor) -> torch.Tensor:
        if x_BrSE.shape[0] > 0:
            return super().forward(x_BrSE)
        # The package's view(Br, C, -1, head_dim) of an empty batch has no shape: attend one row of zeros, keep none.
        return super().forward(x_BrSE.new_zeros(1, *x_BrSE.shape[1:]))[:0]


class RowsLocalFeatureAttentionV2(_RowsLocalFeatureAttention, tabpfn_v2.AlongRowAttention):
    """RowsLocalFeatureAttention over tabpfn's tabpfn_v2.AlongRowAttention."""


class RowsLocalFeatureAttentionV2p5(_RowsLocalFeatureAttention, tabpfn_v2_5.AlongRowAttention):
    """RowsLocalFeatureAttention over tabpfn's tabpfn_v2_5.AlongRowAttention."""


class RowsLocalFeatureAttentionV2p6(_RowsLocalFeatureAttention, tabpfn_v2_6.AlongRowAttention):
    """RowsLocalFeatureAttention over tabpfn's tabpfn_v2_6.AlongRowAttention."""
