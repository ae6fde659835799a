"""The facts a backend receives with q, k, v: shapes, sharding, masks.

For a distributed backend the facts are agreed on first: every rank of the sp
group shares its local shapes over the CPU metadata group, so a rank whose
input disagrees (another batch, head count or dtype) makes every rank raise
the same clear error instead of a hang or a silently wrong result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from .context import Context, exchange_ints
from .layout import LayoutKind, SeqLayout, Span

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call in the canonical layout ``(batch, heads, seq_local, head_dim)``.

    ``q_layout``/``kv_layout`` say which global positions along the attention
    dim each rank of ``group`` holds; ``kv_len`` keeps keys at global positions
    ``< kv_len`` only; ``causal`` lets query ``i`` see keys ``<= i``.
    ``options`` carries backend-specific settings from the module
    (``backend_options``), e.g. a composition's inner strategy.
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    q_layout: SeqLayout
    kv_layout: SeqLayout
    rank: int
    causal: bool
    kv_len: int | None
    scale: float
    dropout: float = 0.0
    cross: bool = False
    mesh_shape: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    context: Context | None = None
    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        """Ranks sharing the attention dim."""
        return self.q_layout.size

    @property
    def q_spans(self) -> tuple[Span, ...]:
        return self.q_layout.spans(self.rank)

    def kv_spans(self, rank: int | None = None) -> tuple[Span, ...]:
        return self.kv_layout.spans(self.rank if rank is None else rank)

    def kv_block(self, rank: int | None = None) -> KeyBlock:
        """The keys of ``rank`` (default this one) that survive ``kv_len``."""
        spans, rows, row = [], [], 0
        for a, b in self.kv_spans(rank):
            stop = b if self.kv_len is None else min(b, self.kv_len)
            if stop > a:
                spans.append((a, stop))
                if rows and rows[-1].stop == row:  # adjacent rows: one slice, so take() is a view
                    rows[-1] = slice(rows[-1].start, row + stop - a)
                else:
                    rows.append(slice(row, row + stop - a))
            row += b - a
        return KeyBlock(tuple(spans), tuple(rows))


@dataclass(frozen=True)
class KeyBlock:
    """Key positions of one rank below ``kv_len`` and the local rows that hold them."""

    spans: tuple[Span, ...]
    rows: tuple[slice, ...]

    @property
    def size(self) -> int:
        return sum(r.stop - r.start for r in self.rows)

    def take(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Those rows of ``t`` along ``dim``, compacted (a view when they are one run)."""
        parts = [t.narrow(dim, r.start, r.stop - r.start) for r in self.rows]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return t.narrow(dim, 0, 0)
        return torch.cat(parts, dim)

    def put(self, compact: torch.Tensor, like: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Inverse of :meth:`take`: ``compact`` placed at its rows of a zero tensor shaped like ``like``."""
        if len(self.rows) == 1 and self.size == like.shape[dim]:
            return compact.to(like.dtype)
        out = torch.zeros_like(like)
        offset = 0
        for r in self.rows:
            n = r.stop - r.start
            out.narrow(dim, r.start, n).copy_(compact.narrow(dim, offset, n))
            offset += n
        return out


def _check_kv_len(kv_len: int | None, total: int) -> None:
    if kv_len is not None and not 1 <= kv_len <= total:
        raise ValueError(f"kv_len={kv_len} is outside [1, {total}] (the global key length along the attention dim)")


def build_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    context: Context | None,
    layout: LayoutKind,
    kv_len: int | None,
    causal: bool,
    scale: float,
    dropout: float = 0.0,
    cross: bool = False,
    mesh_shape: tuple[int, ...] | None = None,
    options: Mapping[str, Any] | None = None,
) -> AttentionProblem:
    """Describe an attention call; with a ``context`` the attention dim is sharded over its sp group."""
    b, h, length, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    common = dict(
        batch=b,
        heads=h,
        kv_heads=hkv,
        head_dim=d,
        dtype=q.dtype,
        device=q.device,
        causal=causal,
        kv_len=kv_len,
        scale=scale,
        dropout=dropout,
        cross=cross,
        mesh_shape=mesh_shape,
        options=MappingProxyType(dict(options or {})),
    )
    if context is None:
        _check_kv_len(kv_len, s)
        return AttentionProblem(q_layout=SeqLayout((length,)), kv_layout=SeqLayout((s,)), rank=0, **common)
    dtype_code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    facts = [length, s, b, h, hkv, d, -1 if kv_len is None else kv_len, int(causal), dtype_code, int(cross)]
    table = exchange_ints(context, facts)
    _check_agreement(table, context)
    q_layout = SeqLayout(tuple(table[:, 0].tolist()), layout)
    kv_layout = SeqLayout(tuple(table[:, 1].tolist()), layout)
    _check_kv_len(kv_len, kv_layout.total)
    return AttentionProblem(
        q_layout=q_layout, kv_layout=kv_layout, rank=context.sp_rank, context=context, group=context.sp_group, **common
    )


_FACT_NAMES = (
    "batch (all dims but attention and embed, folded)",
    "heads",
    "kv heads",
    "head dim",
    "kv_len",
    "causal",
    "dtype",
    "cross-attention (kv given)",
)


def _check_agreement(table: torch.Tensor, context: Context) -> None:
    for column, name in zip(range(2, table.shape[1]), _FACT_NAMES, strict=True):
        values = table[:, column].tolist()
        if len(set(values)) != 1:
            if name == "dtype":
                values = [str(_DTYPES[v]) if v >= 0 else "other" for v in values]
            raise ValueError(
                f"attention inputs disagree across the sp group: {name} is {values} on sp ranks "
                f"0..{context.sp_size - 1}; every rank must pass the same shapes except along the attention dim"
            )
