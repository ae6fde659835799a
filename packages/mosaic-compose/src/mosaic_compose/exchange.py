"""The all-to-all between sequence sharding and head sharding, with its autograd.

Before: every rank of a group holds all heads of its own rows (its spans of
global positions). After: every rank holds ``1/P`` of the heads for the rows
of the whole group, ordered by global position, so the positions form a few
sorted spans (one when the group's rows are contiguous). The backward of
each direction is the other direction. Ranks may hold different numbers of
rows, none included: the uneven ``all_to_all_single`` moves exactly the rows
that exist, so nothing is padded.

On the wire rows come first, ``(rows, ..., heads / P, head_dim)``, so the
rows for (or from) one rank are one contiguous block and the collective is
the single uneven :func:`mosaic.comm.all_to_all_uneven` along dim 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mosaic.sdk import Span, all_to_all_uneven

Run = tuple[int, int]  # (first row, row count)


def merge_spans(spans: list[Span]) -> tuple[Span, ...]:
    """Sorted union of disjoint spans, adjacent spans joined, empty spans dropped."""
    out: list[Span] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _join_runs(runs: list[Run]) -> tuple[Run, ...]:
    """Join runs that continue each other, so a reorder copies as few blocks as possible."""
    out: list[Run] = []
    for start, n in runs:
        if out and sum(out[-1]) == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((start, n))
    return tuple(out)


def _take(t: torch.Tensor, runs: tuple[Run, ...]) -> torch.Tensor:
    """Rows ``runs`` of ``t`` along dim 0, in that order (``t`` itself when that is every row)."""
    if runs == ((0, t.shape[0]),) or (not runs and t.shape[0] == 0):
        return t
    return torch.cat([t.narrow(0, start, n) for start, n in runs])


class HeadExchange:
    """Moves ``(..., heads, rows, head_dim)`` tensors between sequence and head sharding over ``group``.

    Args:
        group: the process group (``None`` only for a group of one).
        rank: this rank's index in ``group``.
        spans: for every rank of ``group``, the global positions of its local rows,
            in local order.
    """

    def __init__(self, group: dist.ProcessGroup | None, rank: int, spans: list[tuple[Span, ...]]):
        self.group, self.rank, self.size = group, rank, len(spans)
        self.spans = tuple(spans)
        self.rows = [sum(b - a for a, b in s) for s in spans]
        self.positions = merge_spans([span for member in spans for span in member])
        # Received rows arrive rank after rank; position order interleaves them when the
        # group's spans interleave (zigzag). Record both directions of that reordering.
        received, row = [], 0
        for member in spans:
            for a, b in member:
                received.append((a, row, b - a))
                row += b - a
        ordered, row = [], 0
        for a, source_row, n in sorted(received):
            ordered.append((a, source_row, row, n))
            row += n
        self._gather = _join_runs([(source_row, n) for _, source_row, _, n in ordered])
        self._scatter = _join_runs([(row, n) for _, _, row, n in sorted(ordered, key=lambda r: r[1])])

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., H, rows_of_this_rank, d)`` -> ``(..., H / P, rows_of_the_group, d)``, position order."""
        if self.size == 1:
            return x
        return _ToHeads.apply(x, self)

    def to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_heads`."""
        if self.size == 1:
            return y
        return _ToSeq.apply(y, self)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        *lead, heads, n, d = x.shape
        p, ld = self.size, len(lead)
        # (P, rows, ..., heads / P, d): the block for rank j is contiguous.
        wire = x.unflatten(-3, (p, heads // p)).permute(ld, ld + 2, *range(ld), ld + 1, ld + 3)
        got = all_to_all_uneven(wire.reshape(p * n, *lead, heads // p, d), [n] * p, self.rows, 0, self.group)
        return _take(got, self._gather).movedim(0, -2)

    def _to_seq(self, y: torch.Tensor) -> torch.Tensor:
        *lead, part, _, d = y.shape
        p, n, ld = self.size, self.rows[self.rank], len(lead)
        wire = _take(y.movedim(-2, 0), self._scatter)
        got = all_to_all_uneven(wire, self.rows, [n] * p, 0, self.group)
        # (P, rows, ..., heads / P, d) -> (..., P, heads / P, rows, d): head blocks in rank order.
        got = got.unflatten(0, (p, n)).permute(*range(2, 2 + ld), 0, ld + 2, 1, ld + 3)
        return got.reshape(*lead, p * part, n, d)


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, exchange: HeadExchange):
        ctx.exchange = exchange
        return exchange._to_heads(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.exchange._to_seq(grad), None


class _ToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, exchange: HeadExchange):
        ctx.exchange = exchange
        return exchange._to_seq(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.exchange._to_heads(grad), None
