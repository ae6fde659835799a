"""Which dims of the model's tensors are sharded over the sp group, and how: declarations follow the data.

Sharding a dim is the user's knowledge, so Mosaic records it where the data
is sharded: ``ctx.shard(x, dim)`` and ``ctx.sharded_dim(total, dim)`` declare
that dim ``dim`` (counted from the front) holds ``total`` positions laid out
over the sp group (``contiguous`` or ``zigzag``), i.e. every rank's local
length. A sharded call then recognises its attention dim *by its length*,
not by where the dim sits in the tensor, so a reshape or a transpose between
``ctx.shard`` and the call changes nothing:

- a distributed backend runs only over a dim whose every rank's length is a
  declared layout (queries replicated on every rank over such keys included);
  a whole dim (every rank holds all of it) or any other dim raises on every
  rank — unless the caller says ``sharded=True`` (a K/V cache of the rows each
  rank holds, say);
- ``local`` refuses keys whose length is this rank's part of a declared dim
  that is really split (a dim of the same length that is whole on every rank
  can say ``sharded=False``);
- when the lengths say which declared dim a call attends over, every rank
  knows every rank's length from the declaration alone, so the call needs no
  host exchange once it is planned.

:class:`ShardedDim` is the declaration a model works with (positions,
prefix masks for the train rows, the group its reductions run over).
"""

from __future__ import annotations

import builtins
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import LayoutKind, SeqLayout, Span, check_layout

__all__ = ["AMBIGUOUS", "Declarations", "Declared", "ShardedDim"]


@dataclass(frozen=True)
class Declared:
    """A dim of ``total`` positions sharded as ``kind``: every rank's local length is ``layout``'s.

    ``total`` (and ``layout``) ``None``: declared sharded without saying its length (``declare_sharded``
    without ``total``): calls over it agree on every rank's length each time.
    """

    total: int | None
    kind: str
    layout: SeqLayout | None = None


# Two declared dims of different totals share this rank's local length: its length says nothing.
AMBIGUOUS = Declared(-2, "contiguous")


class Declarations:
    """The sharded dims of this rank's model tensors, newest first: at most ``KEPT`` of them.

    A dim (counted from the front) may hold several declarations of different totals (the
    queries' rows and a cross-attention source's, say); declaring one again makes it the newest.
    """

    KEPT = 8

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self._entries: OrderedDict[tuple[int, int, str], Declared] = OrderedDict()
        self.grids: dict[int, str] = {}  # dims sharded as one side of a 2-D grid (MultiAxisAttention2D)

    def declare(self, dim: int, total: int | None, layout: LayoutKind = "contiguous") -> Declared:
        if dim < 0:
            raise ValueError(f"declare dims counted from the front (>= 0), got {dim}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be a non-negative int (the positions of the whole dim), got {total!r}")
        check_layout(layout)
        key = (dim, -1 if total is None else total, layout)
        self._entries.pop(key, None)
        layout_of = None if total is None else SeqLayout.even(total, self.size, layout)
        self._entries[key] = Declared(total, layout, layout_of)
        while len(self._entries) > self.KEPT:
            self._entries.popitem(last=False)
        return self._entries[key]

    def declare_grid(self, dim: int, grid: str) -> None:
        """Declare dim ``dim`` sharded as one side of a 2-D grid (``grid`` names the grid and the side)."""
        self.grids[dim] = grid

    def withdraw(self, dim: int) -> None:
        for key in [key for key in self._entries if key[0] == dim]:
            del self._entries[key]
        self.grids.pop(dim, None)

    def all(self) -> list[Declared]:
        return list(self._entries.values())

    def at(self, dim: int) -> Declared | None:
        """The newest declaration of dim ``dim``."""
        found = [d for (at, _, _), d in self._entries.items() if at == dim]
        return found[-1] if found else None

    def of_length(self, length: int) -> Declared | None:
        """The declared dim this rank holds ``length`` positions of (``AMBIGUOUS`` when several totals fit)."""
        if self.size == 1:
            return None
        found = {d.total: d for d in self._entries.values() if d.layout and d.layout.lengths[self.rank] == length}
        if len(found) > 1:
            return AMBIGUOUS
        return next(iter(found.values()), None)

    def split(self, length: int) -> Declared | None:
        """The declared dim this rank holds ``length`` of when that is a real part of it (``length < total``)."""
        found = self.of_length(length)
        return found if found is not None and found is not AMBIGUOUS and found.total > length else None

    def open_kinds(self) -> set[str]:
        """Layouts of dims declared sharded without their length (any lengths of that kind pass the check)."""
        return {d.kind for d in self._entries.values() if d.total is None}

    def digest(self) -> int:
        """The same number on every rank that declared the same dims (they are agreed with a call's facts)."""
        return zlib.crc32(repr(sorted(self._entries)).encode())

    def matches(self, lengths: tuple[int, ...], kind: str) -> bool:
        """Whether every rank's ``lengths`` (with ``kind``) are a declared layout."""
        return any(d.layout and d.layout.lengths == lengths and d.kind == kind for d in self._entries.values())


@dataclass(frozen=True)
class ShardedDim:
    """This rank's part of a dim of ``total`` positions sharded over the sp group.

    Attributes:
        total: positions of the whole dim.
        spans: the global positions of the local rows, in local order (one span for the
            contiguous layout, two for zigzag; none for a rank that holds no row).
        layout: ``"contiguous"`` or ``"zigzag"``.
        group: the process group its reductions (:mod:`mosaic.sharded`) run over; ``None`` for a
            dim that is whole on this rank or a group of one.
        length: local rows (a property).
        offset: global position of the first local row (a property; 0 for a rank that holds none).

    Build it with ``ctx.sharded_dim(total, dim, layout)``, or :meth:`whole` for a dim that is not sharded.
    """

    total: int
    spans: tuple[Span, ...]
    layout: str = "contiguous"
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(
        cls, total: int, rank: int, size: int, layout: LayoutKind = "contiguous", group: dist.ProcessGroup | None = None
    ) -> ShardedDim:
        """Rank ``rank``'s part of ``total`` positions over ``size`` ranks (``group``: theirs)."""
        spans = SeqLayout.even(total, size, layout).spans(rank)
        return cls(total, spans, layout, group if size > 1 else None)

    @classmethod
    def whole(cls, total: int) -> ShardedDim:
        """A dim that is not sharded: this rank holds every position."""
        return cls(total, ((0, total),) if total else ())

    @property
    def length(self) -> int:
        """Local rows."""
        return builtins.sum(b - a for a, b in self.spans)

    @property
    def offset(self) -> int:
        """Global position of the first local row (contiguous layout: the rows are ``[offset, offset + length)``)."""
        return self.spans[0][0] if self.spans else 0

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global position of every local row, ``(length,)`` int64."""
        parts = [torch.arange(a, b, device=device) for a, b in self.spans]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    def prefix_mask(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(length,)`` bool: which local rows sit at global positions ``< n`` (e.g. the training rows)."""
        return self.positions(device) < n

    def prefix_count(self, n: int) -> int:
        """How many local rows sit at global positions ``< n``."""
        return builtins.sum(builtins.max(0, builtins.min(b, n) - a) for a, b in self.spans)

    def take(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's rows of a tensor that holds all ``total`` positions along ``dim``."""
        if full.shape[dim] != self.total:
            raise ValueError(f"expected {self.total} positions along dim {dim}, got {full.shape[dim]}")
        parts = [full.narrow(dim, a, b - a) for a, b in self.spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim) if parts else full.narrow(dim, 0, 0)
