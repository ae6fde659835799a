"""How one tensor dim is spread over the ranks of a group.

A *span* is a half-open range ``[start, stop)`` of global positions along the
sharded dim. A rank's local tensor holds its spans one after another, in
order, so local row ``i`` always has a larger global position than row
``i - 1``. Two layouts exist:

- ``contiguous``: rank ``r`` holds one span; lengths follow
  ``torch.tensor_split`` (the first ``N % P`` ranks hold one more row).
- ``zigzag``: the dim is cut into ``2P`` chunks (``tensor_split`` again) and
  rank ``r`` holds chunks ``r`` and ``2P - 1 - r``. Under causal attention
  every rank then does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "LAYOUTS",
    "LayoutKind",
    "SeqLayout",
    "Span",
    "check_layout",
    "from_zigzag",
    "shard",
    "split_sizes",
    "to_zigzag",
    "unshard",
]

LayoutKind = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")

Span = tuple[int, int]


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(x, parts)`` for a dim of length ``total``."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def check_layout(kind: str) -> None:
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class SeqLayout:
    """Global positions held by every rank of a group along one dim.

    Args:
        lengths: local length on each rank, in group-rank order.
        kind: ``"contiguous"`` or ``"zigzag"``.
        rank_spans: explicit spans per rank (:meth:`from_spans`), for layouts that
            derive from others, e.g. the union of a head group's positions inside a
            composition; ``kind`` then names the layout they derive from.
    """

    lengths: tuple[int, ...]
    kind: LayoutKind = "contiguous"
    rank_spans: tuple[tuple[Span, ...], ...] | None = None

    def __post_init__(self) -> None:
        check_layout(self.kind)
        if self.rank_spans is not None:
            held = tuple(sum(b - a for a, b in spans) for spans in self.rank_spans)
            if held != self.lengths:
                raise ValueError(f"lengths {list(self.lengths)} differ from the rows of the spans {list(held)}")
        elif self.kind == "zigzag":
            expected = _zigzag_lengths(self.total, self.size)
            if self.lengths != expected:
                raise ValueError(
                    f"local lengths {list(self.lengths)} do not follow the zigzag layout of "
                    f"{self.total} positions over {self.size} ranks (expected {list(expected)}); "
                    "shard inputs with ctx.shard(x, dim, layout='zigzag')"
                )

    @classmethod
    def even(cls, total: int, size: int, kind: LayoutKind = "contiguous") -> SeqLayout:
        """The layout ``Context.shard`` produces for ``total`` positions on ``size`` ranks."""
        check_layout(kind)
        if kind == "contiguous":
            return cls(tuple(split_sizes(total, size)), kind)
        return cls(_zigzag_lengths(total, size), kind)

    @classmethod
    def from_spans(cls, rank_spans: list[tuple[Span, ...]], kind: LayoutKind = "contiguous") -> SeqLayout:
        """A layout given rank by rank; each rank's spans ascend in position."""
        spans = tuple(tuple(s) for s in rank_spans)
        return cls(tuple(sum(b - a for a, b in s) for s in spans), kind, spans)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def spans(self, rank: int) -> tuple[Span, ...]:
        """Global position spans held by ``rank``, in local order (empty spans dropped)."""
        if self.rank_spans is not None:
            return self.rank_spans[rank]
        if self.kind == "contiguous":
            start = sum(self.lengths[:rank])
            spans: tuple[Span, ...] = ((start, start + self.lengths[rank]),)
        else:
            bounds = _bounds(split_sizes(self.total, 2 * self.size))
            spans = (bounds[rank], bounds[2 * self.size - 1 - rank])
        return tuple(s for s in spans if s[1] > s[0])


def _zigzag_lengths(total: int, size: int) -> tuple[int, ...]:
    chunks = split_sizes(total, 2 * size)
    return tuple(chunks[r] + chunks[2 * size - 1 - r] for r in range(size))


def _bounds(sizes: list[int]) -> list[Span]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def shard(x: torch.Tensor, dim: int, rank: int, size: int, kind: LayoutKind = "contiguous") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (a view when contiguous)."""
    check_layout(kind)
    if kind == "contiguous":
        return x.tensor_split(size, dim)[rank]
    chunks = x.tensor_split(2 * size, dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim)


def unshard(parts: list[torch.Tensor], dim: int, kind: LayoutKind = "contiguous") -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's part, in rank order."""
    check_layout(kind)
    if kind == "contiguous":
        return torch.cat(parts, dim)
    size = len(parts)
    total = sum(p.shape[dim] for p in parts)
    chunks = split_sizes(total, 2 * size)
    ordered: list[torch.Tensor | None] = [None] * (2 * size)
    for r, part in enumerate(parts):
        first, second = part.split([chunks[r], chunks[2 * size - 1 - r]], dim)
        ordered[r], ordered[2 * size - 1 - r] = first, second
    return torch.cat(ordered, dim)  # type: ignore[arg-type]


def to_zigzag(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Reorder a full tensor so that its contiguous split over ``size`` ranks is the zigzag layout."""
    return torch.cat([shard(x, dim, r, size, "zigzag") for r in range(size)], dim)


def from_zigzag(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Inverse of :func:`to_zigzag`."""
    total = x.shape[dim]
    parts = list(x.split(SeqLayout.even(total, size, "zigzag").lengths, dim))
    return unshard(parts, dim, "zigzag")
