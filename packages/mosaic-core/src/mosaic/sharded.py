"""Model code over a sharded dim: where this rank's part sits, reductions, unique, agreed decisions.

A model whose rows are sharded needs, besides attention, the row statistics
the unsharded model takes with ``torch.mean`` / ``torch.std`` / ``torch.unique``
(train-row normalisation, label sets, constant-feature masks), and local
decisions that must come out the same on every rank (a chunk size, whether
to skip a column) — a rank that decides differently runs different
collectives and hangs. Everything here has torch's semantics *on the
unsharded tensor*: ``x`` is this rank's part along ``dim`` (any dim, uneven
parts, empty ones too), the result is what the whole tensor would give, the
same on every rank of the sp group, and the reductions are differentiable
under Mosaic's loss convention (each rank's loss is its share of the total).
``over`` names the sharding: a :class:`ShardedDim` (its group; none for a
dim that is whole) or a Context (its sp group), default the current one.

    shard = ctx.sharded_dim(n_rows, dim=1)          # this rank's rows; declares dim 1 sharded
    train = shard.prefix_mask(n_train, x.device)    # which local rows are training rows
    mean = mosaic.sharded.mean(x, 1, mask=train.view(1, -1, 1), keepdim=True, over=shard)
    std = mosaic.sharded.std(x, 1, mask=train.view(1, -1, 1), keepdim=True, over=shard)
    classes = mosaic.sharded.unique(y[:, train], over=shard)
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .comm import all_gather_uneven, all_reduce_sum
from .context import Context, get_context
from .guard import HELPER, site_id
from .layout import LayoutKind, Span

__all__ = [
    "ShardedDim",
    "agree",
    "count",
    "max",
    "mean",
    "min",
    "std",
    "sum",
    "total",
    "unique",
    "var",
]


@dataclass(frozen=True)
class ShardedDim:
    """This rank's part of a dim of ``total`` positions sharded over the sp group.

    Build it with ``ctx.sharded_dim(total, dim, layout)`` (or :meth:`of`); the
    reductions of this module take it as ``over=``.

    Attributes:
        total: positions of the dim over all ranks.
        spans: the global ``(start, stop)`` positions of the local rows, in local
            order: one span for the contiguous layout, two for zigzag, none for an
            empty shard.
        layout: ``"contiguous"`` or ``"zigzag"``.
        group: the process group the dim is sharded over; ``None`` when this rank
            holds it whole (a one-rank sp group, or :meth:`whole`).
        length: local rows (a property).
        offset: global position of the first local row (a property).
    """

    total: int
    spans: tuple[Span, ...]
    layout: str = "contiguous"
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(cls, context: Context, total: int, layout: LayoutKind = "contiguous") -> ShardedDim:
        """This rank's part of ``total`` positions over ``context``'s sp group, in ``layout``."""
        spans = context.layout(total, layout).spans(context.sp_rank)
        return cls(total, spans, layout, context.sp_group if context.sp_size > 1 else None)

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


Over = ShardedDim | Context | None


def _group(over: Over) -> dist.ProcessGroup | None:
    """The group a reduction runs over: the shard's, or the sp group of ``over`` (default: the context's)."""
    if isinstance(over, ShardedDim):
        return over.group
    ctx = over or get_context()
    return ctx.sp_group if ctx.sp_size > 1 else None


def _reduced(name: str, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``local`` (a per-rank partial result) once every rank has shown the same shape and dtype.

    A rank whose tensor differs would make the collective that follows abort or
    hang; the guard turns it into the same error on every rank.
    """
    if group is not None:
        what = f"mosaic.sharded.{name}"
        facts = [site_id(str(local.dtype)), local.dim(), *local.shape]
        rows = get_context().guard.agree(HELPER, what, facts)
        if len(set(rows)) != 1:
            shapes = [tuple(r[2:]) for r in rows]
            raise ValueError(
                f"{what}: the ranks' partial results differ in shape or dtype ({shapes}); every rank must pass "
                "tensors that agree in every dim but the sharded one"
            )
    return local


def _masked(x: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    return x if mask is None else torch.where(mask, x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def count(
    x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None, keepdim: bool = False, over: Over = None
) -> torch.Tensor:
    """Entries along the global ``dim`` (those where ``mask`` is true), shaped like the reduction; int64."""
    ones = torch.ones_like(x, dtype=torch.int64) if mask is None else mask.expand_as(x).to(torch.int64)
    group = _group(over)
    local = _reduced("count", ones.sum(dim, keepdim=keepdim), group)
    if group is not None:
        dist.all_reduce(local, group=group)
    return local


def sum(
    x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None, keepdim: bool = False, over: Over = None
) -> torch.Tensor:
    """``x.sum(dim)`` of the unsharded tensor (over the entries where ``mask`` is true); differentiable."""
    group = _group(over)
    return all_reduce_sum(_reduced("sum", _masked(x, mask, 0.0).sum(dim, keepdim=keepdim), group), group)


def mean(
    x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None, keepdim: bool = False, over: Over = None
) -> torch.Tensor:
    """``x.mean(dim)`` of the unsharded tensor (of the entries where ``mask`` is true); differentiable."""
    n = count(x, dim, mask=mask, keepdim=keepdim, over=over)
    return sum(x, dim, mask=mask, keepdim=keepdim, over=over) / n.to(x.dtype)


def var(
    x: torch.Tensor,
    dim: int,
    *,
    mask: torch.Tensor | None = None,
    unbiased: bool = True,
    keepdim: bool = False,
    over: Over = None,
) -> torch.Tensor:
    """``x.var(dim, unbiased=...)`` of the unsharded tensor; differentiable.

    Two passes (the mean, then squared deviations), as torch computes it: one
    pass of sums and sums of squares loses digits when the mean is large
    against the spread.
    """
    m = mean(x, dim, mask=mask, keepdim=True, over=over)
    n = count(x, dim, mask=mask, keepdim=keepdim, over=over)
    squares = sum((x - m).square(), dim, mask=mask, keepdim=keepdim, over=over)
    return squares / (n - int(unbiased)).to(x.dtype)


def std(
    x: torch.Tensor,
    dim: int,
    *,
    mask: torch.Tensor | None = None,
    unbiased: bool = True,
    keepdim: bool = False,
    over: Over = None,
) -> torch.Tensor:
    """``x.std(dim, unbiased=...)`` of the unsharded tensor; differentiable."""
    return var(x, dim, mask=mask, unbiased=unbiased, keepdim=keepdim, over=over).sqrt()


class _AllReduceExtreme(torch.autograd.Function):
    """The max (or min) over a group; the gradient goes to the entries that hold it, split among ties."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, keepdim: bool, largest: bool, group):
        local = _reduced(
            "max" if largest else "min", x.amax(dim, keepdim=True) if largest else x.amin(dim, keepdim=True), group
        )
        if group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN, group=group)
        hits = (x == local).to(x.dtype)
        ties = hits.sum(dim, keepdim=True)
        if group is not None:
            dist.all_reduce(ties, group=group)
        ctx.save_for_backward(hits, ties)
        ctx.dim, ctx.keepdim, ctx.group = dim, keepdim, group
        return local if keepdim else local.squeeze(dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hits, ties = ctx.saved_tensors
        if not ctx.keepdim:
            grad = grad.unsqueeze(ctx.dim)
        # Every rank used the same extreme: its gradient is the sum of theirs.
        if ctx.group is not None:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
        return hits * grad / ties, None, None, None, None


def max(
    x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None, keepdim: bool = False, over: Over = None
) -> torch.Tensor:
    """``x.amax(dim)`` of the unsharded tensor (over entries where ``mask`` is true); differentiable."""
    return _AllReduceExtreme.apply(_masked(x, mask, float("-inf")), dim % x.dim(), keepdim, True, _group(over))


def min(
    x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None, keepdim: bool = False, over: Over = None
) -> torch.Tensor:
    """``x.amin(dim)`` of the unsharded tensor (over entries where ``mask`` is true); differentiable."""
    return _AllReduceExtreme.apply(_masked(x, mask, float("inf")), dim % x.dim(), keepdim, False, _group(over))


def unique(x: torch.Tensor, *, return_counts: bool = False, over: Over = None):
    """``torch.unique`` (sorted) of every rank's ``x`` together: the values of the unsharded tensor.

    Each rank contributes its distinct values (with their counts); one
    variable-size gather joins them.
    """
    values, counts = torch.unique(x.reshape(-1), return_counts=True)
    group = _group(over)
    if group is not None:
        sizes = get_context().gather_sizes(values.numel())
        values = all_gather_uneven(values, sizes, 0, group)
        counts = all_gather_uneven(counts, sizes, 0, group)
        values, where = torch.unique(values, return_inverse=True)
        counts = torch.zeros(values.numel(), dtype=counts.dtype, device=counts.device).index_add_(0, where, counts)
    return (values, counts) if return_counts else values


def total(length: int, context: Context | None = None) -> int:
    """The global length of a sharded dim whose local length is ``length`` (e.g. the global key count)."""
    return builtins.sum((context or get_context()).gather_sizes(int(length)))


Agreement = Literal["equal", "max", "min", "sum", "all", "any"]


def agree(value: int | bool, how: Agreement = "equal", *, context: Context | None = None) -> int | bool:
    """One value for every rank from each rank's local ``value`` (an int or a bool).

    ``how="equal"`` raises on every rank when the ranks' values differ (a
    decision that must not depend on local data); ``"max"``/``"min"``/``"sum"``
    combine them; ``"all"``/``"any"`` for bools. Use it for local decisions
    that choose collectives: chunk sizes, whether to run a branch.
    """
    if how not in ("equal", "max", "min", "sum", "all", "any"):
        raise ValueError(f"how must be one of equal, max, min, sum, all, any; got {how!r}")
    ctx = context or get_context()
    mine = int(value)
    values = [row[0] for row in ctx.guard.agree(HELPER, f"mosaic.sharded.agree({how})", [mine])]
    if how == "equal":
        if len(set(values)) != 1:
            raise ValueError(
                f"mosaic.sharded.agree: the ranks' values differ ({values}); a decision that chooses collectives "
                "must be the same on every rank"
            )
        return value
    combined = {"max": builtins.max, "min": builtins.min, "sum": builtins.sum}.get(how)
    if combined is not None:
        return combined(values)
    return (builtins.all if how == "all" else builtins.any)(bool(v) for v in values)
