"""The facts a backend plans from: shapes, sharding, masks, options — the same on every rank.

An :class:`AttentionProblem` describes one attention call in the canonical
layout ``(batch, heads, seq_local, head_dim)``. For a distributed backend it
is built from the facts the ranks agreed on (:mod:`mosaic.agreement`), or
derived from the sharding declarations when a plan is cached, so every rank
of the sp group holds the same facts (and its own ``rank``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .kernels import BlockSpec
from .layout import SeqLayout, Span
from .options import NoOptions, Options

if TYPE_CHECKING:
    from .context import Context

__all__ = ["DTYPES", "AttentionProblem", "KeyBlock", "check_kv_len", "kv_len_int"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class AttentionProblem:
    """One attention call in the canonical layout ``(batch, heads, seq_local, head_dim)``.

    ``q_layout``/``kv_layout`` say which global positions along the attention
    dim each rank of ``group`` holds; ``kv_len`` keeps keys at global positions
    ``< kv_len`` only; ``causal`` lets query ``i`` see keys ``<= i``;
    ``options`` are the backend's typed options; ``batch_shape`` the dims
    folded into ``batch`` (row-major), for backends that redistribute them;
    ``backward`` whether a backward will run (``auto`` ranks inference by its
    forward alone). ``context`` and ``group`` say where the plan runs; a plan
    is decided without them and makes no group: the groups it runs on come
    from ``context`` when it is built (:meth:`mosaic.Context.grid`).
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
    options: Options = field(default_factory=NoOptions)
    batch_shape: tuple[int, ...] = ()
    backward: bool = True
    context: Context | None = None
    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        """Ranks sharing the attention dim."""
        return self.q_layout.size

    @property
    def q_spans(self) -> tuple[Span, ...]:
        return self.q_layout.spans(self.rank)

    @property
    def key(self) -> tuple[Any, ...]:
        """Everything a plan may depend on, hashable: plans are cached by it (the kernel ``MOSAIC_KERNEL``
        forces too, which a plan's blocks run)."""
        return (
            self.batch, self.heads, self.kv_heads, self.head_dim, self.dtype, self.device, self.q_layout,
            self.kv_layout, self.rank, self.causal, self.kv_len, self.scale, self.dropout, self.cross, self.options,
            self.batch_shape, self.backward, id(self.group), os.environ.get("MOSAIC_KERNEL"),
        )  # fmt: skip

    def block_spec(self, q_len: int = 0, k_len: int = 0, causal: bool = False) -> BlockSpec:
        """The kernels' view of a block of this problem (device, dtype, head dim, heads), ``q_len`` x ``k_len``."""
        return BlockSpec(self.device, self.dtype, self.head_dim, q_len, k_len, self.heads, self.kv_heads, self.batch,
                         causal)  # fmt: skip

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

    def pairs(self, rank: int | None = None) -> int:
        """Visible (query, key) pairs of ``rank``'s queries (default this rank) over all keys, one head."""
        m = self.kv_layout.total if self.kv_len is None else self.kv_len
        spans = self.q_layout.spans(self.rank if rank is None else rank)
        if not self.causal:
            return sum(b - a for a, b in spans) * m

        def seen(stop: int) -> int:  # sum over queries i < stop of min(i + 1, m)
            tri = min(stop, m)
            return tri * (tri + 1) // 2 + max(0, stop - m) * m

        return sum(seen(b) - seen(a) for a, b in spans)

    def busiest_pairs(self) -> int:
        """:meth:`pairs` of the rank with the most: the step time of a balanced schedule."""
        return max(self.pairs(r) for r in range(self.size))


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


def kv_len_int(kv_len: Any) -> int | None:
    """``kv_len`` as an int: ints, numpy integers and 0-d integer tensors; a ``TypeError`` otherwise."""
    if kv_len is None:
        return None
    if isinstance(kv_len, bool) or (isinstance(kv_len, torch.Tensor) and kv_len.is_floating_point()):
        raise TypeError(f"kv_len must be an int, got {kv_len!r}")
    try:
        return int(kv_len.__index__())
    except (AttributeError, TypeError, RuntimeError):
        raise TypeError(f"kv_len must be an int, got {type(kv_len).__name__}") from None


def check_kv_len(kv_len: int | None, total: int) -> None:
    if kv_len is not None and not 1 <= kv_len <= total:
        raise ValueError(f"kv_len={kv_len} is outside [1, {total}] (the global key length along the attention dim)")
