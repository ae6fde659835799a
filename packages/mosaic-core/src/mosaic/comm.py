"""Collectives the strategies share: uneven gathers, their autograd, and a P2P ring.

Gathers and scatters work along any dim and allow every rank its own length
(a rank may contribute nothing: the key rows past ``kv_len``).

Every collective here reports to :func:`count_traffic`: the bytes that reach
this rank, as the bandwidth-optimal algorithm moves them (an all-gather brings
every other rank's rows; a reduce-scatter brings ``P - 1`` copies of this
rank's rows; an all-to-all and a P2P receive bring what they receive), keyed
by the global ranks of the group and by the global rank they come from.
Benchmarks use it to report measured communication per strategy, and bytes
that cross node boundaries.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from ._compat import all_gather_single, reduce_scatter_single


class TrafficMeter:
    """Bytes that reached this rank through Mosaic's collectives, by group and by sender (global ranks)."""

    def __init__(self) -> None:
        self.received: dict[tuple[int, ...], int] = defaultdict(int)
        self.received_from: dict[int, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.received.values())

    def from_outside(self, node_size: int, rank: int) -> int:
        """Bytes from ranks on other nodes, nodes being runs of ``node_size`` global ranks."""
        return sum(n for src, n in self.received_from.items() if src // node_size != rank // node_size)


_meters: list[TrafficMeter] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficMeter]:
    """Count the bytes Mosaic's collectives bring to this rank inside the block."""
    meter = TrafficMeter()
    _meters.append(meter)
    try:
        yield meter
    finally:
        _meters.remove(meter)


def _record(group: dist.ProcessGroup, per_sender: list[int]) -> None:
    """``per_sender[r]``: bytes that group rank ``r`` sends to this rank."""
    if _meters and any(per_sender):
        ranks = dist.get_process_group_ranks(group)
        for meter in _meters:
            meter.received[tuple(ranks)] += sum(per_sender)
            for src, nbytes in zip(ranks, per_sender, strict=True):
                meter.received_from[src] += nbytes


def _row_bytes(x: torch.Tensor) -> int:
    """Bytes of one slice along dim 0."""
    return math.prod(x.shape[1:]) * x.element_size()


def _is_gloo(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == "gloo"


def all_gather_uneven(x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate along ``dim`` every rank's ``x``, where rank ``r`` holds ``sizes[r]`` rows.

    Equal sizes use one ``all_gather`` into a single buffer; unequal sizes let
    NCCL move exactly the rows that exist (ranks holding none send nothing);
    gloo, which needs equal sizes, pads.
    """
    rank = dist.get_rank(group)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {x.shape[dim]} rows along dim {dim}, expected {sizes[rank]}")
    x = x.movedim(dim, 0)
    _record(group, [0 if r == rank else n * _row_bytes(x) for r, n in enumerate(sizes)])
    if len(set(sizes)) == 1 or _is_gloo(group):
        width = max(sizes)
        padded = x if x.shape[0] == width else torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
        out = x.new_empty((len(sizes) * width, *x.shape[1:]))
        all_gather_single(out, padded.contiguous(), group=group)
        if len(set(sizes)) != 1:
            out = torch.cat([out[r * width : r * width + n] for r, n in enumerate(sizes)])
    else:
        parts = [x.new_empty((n, *x.shape[1:])) for n in sizes]
        dist.all_gather(parts, x.contiguous(), group=group)
        out = torch.cat(parts)
    return out.movedim(0, dim)


def reduce_scatter_uneven(x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ranks and give rank ``r`` rows ``[sum(sizes[:r]), sum(sizes[:r+1]))`` along ``dim``."""
    rank = dist.get_rank(group)
    x = x.movedim(dim, 0)
    _record(group, [0 if r == rank else sizes[rank] * _row_bytes(x) for r in range(len(sizes))])
    if len(set(sizes)) == 1:
        out = x.new_empty((sizes[rank], *x.shape[1:]))
        reduce_scatter_single(out, x.contiguous(), group=group)
    else:
        parts = [p.contiguous() for p in x.split(sizes)]
        out = x.new_empty((sizes[rank], *x.shape[1:]))
        dist.reduce_scatter(out, parts, group=group)
    return out.movedim(0, dim)


class GatherAlong(torch.autograd.Function):
    """All-gather along a dim; the backward reduce-scatters the gradient to the owners.

    The gradient is summed in fp32 (fp64 stays fp64): P low-precision partial
    sums would otherwise add an error that grows with the group size.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return all_gather_uneven(x, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32))
        return reduce_scatter_uneven(wide, ctx.sizes, ctx.dim, ctx.group).to(grad.dtype), None, None, None


def gather_along(x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable :func:`all_gather_uneven`."""
    return GatherAlong.apply(x, sizes, dim, group)


class AllReduceSum(torch.autograd.Function):
    """Sum over a group; every rank then uses the sum, so the gradient is summed back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum of ``x`` over ``group`` (identity when there is no group)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return AllReduceSum.apply(x, group)


def all_to_all_uneven(
    x: torch.Tensor, send: list[int], recv: list[int], dim: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """Send rows ``split(send)[r]`` of ``x`` along ``dim`` to rank ``r``; concatenate what arrives."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me = dist.get_rank(group)
    _record(group, [0 if r == me else n * _row_bytes(out) for r, n in enumerate(recv)])
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out.movedim(0, dim)


class RingComm:
    """Double-buffered neighbour exchange over ``batch_isend_irecv``.

    ``send_recv`` posts the sends and receives of one step, ``commit`` starts
    them, ``wait`` finishes them, so a step's compute overlaps its transfer.
    A rank passes ``None`` to skip a direction; both ends of a transfer must
    agree, which they do because every rank knows every rank's layout.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []

    def send_recv(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        """Queue sending ``send`` to the next rank and receiving ``recv`` from the previous one.

        ``None`` or an empty tensor posts nothing; both ends know the sizes, so both skip.
        """
        send = send if send is not None and send.numel() else None
        recv = recv if recv is not None and recv.numel() else None
        if send is not None:
            self._ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group))
        if recv is not None:
            self._ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
            sizes = [0] * self.size
            sizes[(self.rank - 1) % self.size] = recv.numel() * recv.element_size()
            _record(self.group, sizes)

    def commit(self) -> None:
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        # The ops hold the buffers until the transfers are done.
        self._ops, self._reqs = [], []


def resized(like: torch.Tensor, rows: int, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor shaped like ``like`` but with ``rows`` along ``dim``."""
    shape = list(like.shape)
    shape[dim] = rows
    return like.new_empty(shape, dtype=dtype)


def rotate(
    group: dist.ProcessGroup,
    held: torch.Tensor,
    rows: list[int],
    dim: int,
    visit: Callable[[int, torch.Tensor], None],
) -> None:
    """Pass blocks round the ring of ``group``, double-buffered.

    At step ``s`` this rank holds a block of ``rows[s]`` rows along ``dim``
    (step 0: ``held``, its own); ``visit(s, block)`` runs while the block for
    step ``s + 1`` arrives from the previous rank and this one goes to the next.
    Blocks without rows travel nowhere.
    """
    comm = RingComm(group)
    for step in range(len(rows)):
        incoming = None
        if step + 1 < len(rows):
            incoming = resized(held, rows[step + 1], dim)
            comm.send_recv(held, incoming)
            comm.commit()
        visit(step, held)
        comm.wait()
        held = incoming


def rotate_back(
    group: dist.ProcessGroup,
    held: torch.Tensor,
    rows: list[int],
    dim: int,
    visit: Callable[[int, torch.Tensor], torch.Tensor],
    acc_dtype: torch.dtype,
) -> torch.Tensor:
    """The backward twin of :func:`rotate`: blocks go round again, each with a gradient accumulator.

    ``visit(s, block)`` returns this rank's gradient for the block it holds at
    step ``s`` (``acc_dtype``, shaped like the block). Each accumulator follows
    its block, every rank adds to it, and one last hop brings it to the block's
    owner. Returns the complete accumulator of this rank's own block.
    """
    comm = RingComm(group)
    grad_prev = None  # the accumulator of the block visited in the previous step
    for step in range(len(rows)):
        incoming = grad_in = None
        if step + 1 < len(rows):
            incoming = resized(held, rows[step + 1], dim)
            comm.send_recv(held, incoming)
        if step > 0:
            # The previous block's accumulator goes on; this block's arrives from behind.
            grad_in = resized(held, rows[step], dim, acc_dtype)
            comm.send_recv(grad_prev, grad_in)
        comm.commit()
        grad = visit(step, held)
        comm.wait()
        if grad_in is not None:
            grad += grad_in
        grad_prev, held = grad, incoming
    own = resized(grad_prev, rows[0], dim)
    comm.send_recv(grad_prev, own)
    comm.commit()
    comm.wait()
    return own
