"""Collectives the strategies share: uneven gathers, their autograd, and a P2P ring.

Gathers and scatters work along any dim and allow every rank its own length
(a rank may contribute nothing: the key rows past ``kv_len``).

CUDA tensors on a gloo group travel through host memory (:func:`staged`):
gloo moves CUDA tensors only for broadcast and all-reduce, and NCCL refuses
two ranks on one GPU, so this is how several ranks share one GPU to test the
GPU kernels on every strategy's code path (``mosaic.init(backend="gloo",
device="cuda:0")``, tests/gpu/check_backends.py ``--one-gpu``). It is a test
mode: each transfer costs two host copies.

A collective that fails (a peer did not come within ``collective_timeout``,
or left) fails the call it serves: :func:`serving` names that call's failure
handler, and the handler makes every rank raise the same error once the
ranks have agreed on it (``Context.fail``), in the forward and in the
backward alike.

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
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ._compat import all_gather_single, reduce_scatter_single

__all__ = [
    "Pace",
    "Pending",
    "RingComm",
    "TrafficMeter",
    "all_gather_uneven",
    "all_reduce",
    "all_reduce_sum",
    "all_to_all_uneven",
    "blocking",
    "count_traffic",
    "forget",
    "reduce_scatter_uneven",
    "resized",
    "rotate",
    "rotate_back",
    "serving",
    "set_backward",
    "set_serving",
    "staged",
    "start_all_gather",
    "start_reduce_scatter",
    "twin_for_backward",
]


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


# The failure handler of the call whose collectives run now (forward, or its backward): it returns the
# error every rank raises. None outside a sharded call: the collective's own error is raised.
_serving: Callable[[BaseException], BaseException] | None = None
# gloo groups of the backward, one beside each of Mosaic's gloo groups: a rank that skipped a backward and
# went on to the next forward must not pair its forward's collectives with the others' backward's (gloo
# aborts the process on a size mismatch, or pairs them silently); on their own groups neither side comes,
# both time out, and the ranks agree on the mismatch. NCCL has none (each communicator costs GPU memory):
# torch's TORCH_DISTRIBUTED_DEBUG=DETAIL finds mismatched collectives there.
_backward_groups: dict[dist.ProcessGroup, dist.ProcessGroup] = {}
_in_backward = False


def twin_for_backward(group: dist.ProcessGroup, twin: dist.ProcessGroup) -> None:
    """Carry the backward's collectives of ``group`` on ``twin`` (the same ranks)."""
    _backward_groups[group] = twin


def forget(groups: list[dist.ProcessGroup]) -> None:
    """Drop the backward twins of ``groups`` (being destroyed)."""
    for group in groups:
        _backward_groups.pop(group, None)


def set_backward(on: bool) -> bool:
    """Route collectives to the backward's groups (``on``) or the forward's; returns the previous setting."""
    global _in_backward
    previous, _in_backward = _in_backward, on
    return previous


def _routed(group: dist.ProcessGroup) -> dist.ProcessGroup:
    return _backward_groups.get(group, group) if _in_backward else group


@contextlib.contextmanager
def serving(handler: Callable[[BaseException], BaseException] | None) -> Iterator[None]:
    """Make ``handler`` the failure handler of the collectives run inside the block."""
    global _serving
    previous, _serving = _serving, handler
    try:
        yield
    finally:
        _serving = previous


def set_serving(handler: Callable[[BaseException], BaseException] | None) -> None:
    """Make ``handler`` the failure handler from now on (a backward pass, which has no block to run in)."""
    global _serving
    _serving = handler


def blocking(run: Callable[[], object]) -> object:
    """``run()``, a collective or the wait for one; its failure becomes the serving call's agreed error."""
    try:
        return run()
    except RuntimeError as exc:
        if _serving is None:
            raise
        raise _serving(exc) from exc


def _slice_bytes(x: torch.Tensor, dim: int) -> int:
    """Bytes of one slice of ``x`` along ``dim``."""
    shape = list(x.shape)
    shape[dim] = 1
    return math.prod(shape) * x.element_size()


def _is_gloo(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == "gloo"


def staged(group: dist.ProcessGroup | None, x: torch.Tensor) -> bool:
    """Whether ``x`` travels through host memory on ``group``: a CUDA tensor on a gloo group."""
    return x.is_cuda and _is_gloo(group)


def _eager() -> bool:
    """Whether to start collectives asynchronously: eagerly yes; a traced graph takes them synchronous (dynamo
    traces no ``async_op``) and its compiler schedules them."""
    return not torch.compiler.is_compiling()


class Pending:
    """A collective in flight. :meth:`wait` makes the current stream wait for it and returns its result.

    Starting several and waiting for each just before its result is needed is
    how strategies overlap communication with their kernels.
    """

    def __init__(self, work: dist.Work | None, finish: Callable[[], torch.Tensor]):
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            blocking(self._work.wait)
        return self._finish()


def start_all_gather(x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup) -> Pending:
    """Start :func:`all_gather_uneven`; ``wait()`` returns its (contiguous) result."""
    group = _routed(group)
    rank = dist.get_rank(group)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {x.shape[dim]} rows along dim {dim}, expected {sizes[rank]}")
    _record(group, [0 if r == rank else n * _slice_bytes(x, dim) for r, n in enumerate(sizes)])
    x = x.contiguous()
    if len(set(sizes)) == 1 or _is_gloo(group):
        width = max(sizes)
        if x.shape[dim] < width:
            x = torch.cat([x, resized(x, width - x.shape[dim], dim).zero_()], dim)
        host = staged(group, x)
        send = x.cpu() if host else x
        flat = send.new_empty((len(sizes) * x.shape[0], *x.shape[1:]))  # rank-major; gloo wants this shape
        work = all_gather_single(flat, send, group=group, async_op=_eager())
        arrived = (lambda: flat.to(x.device)) if host else (lambda: flat)
        if dim == 0 and len(set(sizes)) == 1:
            return Pending(work, arrived)

        def in_place() -> torch.Tensor:  # one copy puts every rank's rows in place along ``dim``
            per_rank = arrived().view(len(sizes), *x.shape)
            return torch.cat([t.narrow(dim, 0, n) for t, n in zip(per_rank, sizes, strict=True)], dim)

        return Pending(work, in_place)
    # Unequal sizes (NCCL): every rank's rows arrive in their own buffer; ranks holding none send nothing.
    parts = [resized(x, n, dim) for n in sizes]
    work = dist.all_gather(parts, x, group=group, async_op=_eager())
    return Pending(work, lambda: torch.cat(parts, dim))


def all_gather_uneven(x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate along ``dim`` every rank's ``x``, where rank ``r`` holds ``sizes[r]`` rows.

    Equal sizes use one ``all_gather`` into a single buffer; unequal sizes let
    NCCL move exactly the rows that exist (ranks holding none send nothing);
    gloo, which needs equal sizes, pads. The result is contiguous.
    """
    return start_all_gather(x, sizes, dim, group).wait()


def start_reduce_scatter(
    x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup, dtype: torch.dtype | None = None
) -> Pending:
    """Start :func:`reduce_scatter_uneven`, summing in ``dtype`` (default ``x``'s).

    The conversion to ``dtype`` happens in the one copy that lays the rows out
    rank by rank for the collective.
    """
    group = _routed(group)
    rank, dtype = dist.get_rank(group), dtype or x.dtype
    _record(group, [0 if r == rank else sizes[rank] * _slice_bytes(x, dim) for r in range(len(sizes))])
    chunks = x.split(sizes, dim)
    host = staged(group, x)
    even = len(set(sizes)) == 1
    if not even and _eager():
        out = resized(x, sizes[rank], dim, dtype)
        got = out.cpu() if host else out
        parts = [resized(chunk, chunk.shape[dim], dim, dtype).copy_(chunk) for chunk in chunks]
        work = dist.reduce_scatter(got, [p.cpu() for p in parts] if host else parts, group=group, async_op=True)
        return Pending(work, (lambda: out.copy_(got)) if host else (lambda: out))
    # One rank-major buffer, every rank's rows padded to the widest (a traced graph has no list form).
    width = max(sizes)
    out = resized(x, width, dim, dtype)
    got = out.cpu() if host else out
    if even and dim == 0 and x.dtype == dtype and x.is_contiguous():
        flat = x
    else:
        make = x.new_empty if even else x.new_zeros
        flat = make((len(sizes) * out.shape[0], *out.shape[1:]), dtype=dtype)
        for row, chunk in zip(flat.view(len(sizes), *out.shape), chunks, strict=True):
            row.narrow(dim, 0, chunk.shape[dim]).copy_(chunk)
    work = reduce_scatter_single(got, flat.cpu() if host else flat, group=group, async_op=_eager())

    def mine() -> torch.Tensor:
        full = out.copy_(got) if host else out
        return full if sizes[rank] == width else full.narrow(dim, 0, sizes[rank]).contiguous()

    return Pending(work, mine)


def reduce_scatter_uneven(
    x: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sum ``x`` over ranks (in ``dtype``, default ``x``'s) and give rank ``r`` rows
    ``[sum(sizes[:r]), sum(sizes[:r+1]))`` along ``dim``."""
    return start_reduce_scatter(x, sizes, dim, group, dtype).wait()


class AllReduceSum(torch.autograd.Function):
    """Sum over a group; every rank then uses the sum, so the gradient is summed back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad.clone(), ctx.group), None


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``x`` reduced in place over ``group`` (not differentiable; :func:`all_reduce_sum` is)."""
    group = _routed(group)
    blocking(lambda: dist.all_reduce(x, op=op, group=group))
    return x


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum of ``x`` over ``group`` (identity when there is no group)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return AllReduceSum.apply(x, group)


def all_to_all_uneven(
    x: torch.Tensor, send: list[int], recv: list[int], dim: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """Send rows ``split(send)[r]`` of ``x`` along ``dim`` to rank ``r``; concatenate what arrives."""
    group = _routed(group)
    device = x.device
    x = x.movedim(dim, 0).contiguous()
    if staged(group, x):
        x = x.cpu()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me = dist.get_rank(group)
    _record(group, [0 if r == me else n * _slice_bytes(out, 0) for r, n in enumerate(recv)])
    blocking(lambda: dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group))
    return out.to(device).movedim(0, dim)


class RingComm:
    """Double-buffered neighbour exchange over ``batch_isend_irecv``.

    ``send_recv`` queues the sends and receives of one step, ``commit`` starts
    them, ``wait`` finishes them, so a step's compute overlaps its transfer.
    A transfer queued ``late`` starts with ``commit(late=True)``, after the
    step's compute (see :class:`Pace`). A rank passes ``None`` to skip a
    direction; both ends of a transfer must agree, which they do because every
    rank knows every rank's layout.
    """

    def __init__(self, group: dist.ProcessGroup, reverse: bool = False):
        self.group = group = _routed(group)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        step = -1 if reverse else 1
        self.next_rank, self.prev_rank = (self.rank + step) % self.size, (self.rank - step) % self.size
        self.next = dist.get_global_rank(group, self.next_rank)
        self.prev = dist.get_global_rank(group, self.prev_rank)
        self._queued: dict[bool, list[dist.P2POp]] = {False: [], True: []}
        self._reqs: list = []
        self._landing: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host buffer, CUDA tensor): staged receives

    def send_recv(
        self, send: torch.Tensor | None, recv: torch.Tensor | None, late_send: bool = False, late_recv: bool = False
    ) -> None:
        """Queue sending ``send`` to the next rank and receiving ``recv`` from the previous one.

        ``None`` or an empty tensor posts nothing; both ends know the sizes, so both skip.
        """
        send = send if send is not None and send.numel() else None
        recv = recv if recv is not None and recv.numel() else None
        if send is not None:
            send = send.cpu() if staged(self.group, send) else send.contiguous()
            self._queued[late_send].append(dist.P2POp(dist.isend, send, self.next, self.group))
        if recv is not None:
            sizes = [0] * self.size
            sizes[self.prev_rank] = recv.numel() * recv.element_size()
            _record(self.group, sizes)
            if staged(self.group, recv):
                host = torch.empty(recv.shape, dtype=recv.dtype)
                self._landing.append((host, recv))
                recv = host
            self._queued[late_recv].append(dist.P2POp(dist.irecv, recv, self.prev, self.group))

    def commit(self, late: bool = False) -> None:
        """Start the queued transfers (``late``: those queued to follow the step's compute)."""
        ops = self._queued[late]
        if ops:
            self._reqs += dist.batch_isend_irecv(ops)  # each request holds its tensors until done
            self._queued[late] = []

    def wait(self) -> None:
        for req in self._reqs:
            blocking(req.wait)
        for host, target in self._landing:
            target.copy_(host)
        self._reqs, self._landing = [], []


class Pace:
    """Where to place each ring transfer, from which ranks compute at which steps.

    A transfer's NCCL kernel occupies SMs from its start until both ends have
    started it. When one end reaches a step having computed fewer blocks than
    the other (a rank holding no keys under ``kv_len``, say), its kernel would
    wait there through that end's whole compute and slow it; that end starts
    the transfer after its compute instead. The model counts blocks computed
    (each as one unit), so every rank derives the same placement. A transfer
    is late only at the end that arrives strictly earlier, so a late start
    never waits, in a cycle, on another late start: no deadlock.
    """

    def __init__(self, busy: Sequence[Sequence[bool]] | None, comm: RingComm, steps: Sequence[int]):
        """``busy[g][s]``: group rank ``g`` computes at step ``s``; ``steps``: the order they run in."""
        self.busy, self.comm = busy, comm
        self.arrival: list[dict[int, int]] = []
        for row in busy or ():
            done, arrival = 0, {}
            for s in steps:
                arrival[s] = done
                done += bool(row[s])
            self.arrival.append(arrival)

    def late(self, step: int, peer: int) -> bool:
        """Whether this rank starts its transfer with group rank ``peer`` at ``step`` after its compute."""
        if self.busy is None:
            return False
        me = self.comm.rank
        return bool(self.busy[me][step]) and self.arrival[me][step] < self.arrival[peer][step]

    def send_recv(self, step: int, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        comm = self.comm
        comm.send_recv(send, recv, self.late(step, comm.next_rank), self.late(step, comm.prev_rank))


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
    busy: Sequence[Sequence[bool]] | None = None,
) -> torch.Tensor:
    """Pass blocks round the ring of ``group``, double-buffered.

    At step ``s`` this rank holds a block of ``rows[s]`` rows along ``dim``
    (step 0: ``held``, its own); ``visit(s, block)`` runs while the block for
    step ``s + 1`` arrives from the previous rank and this one goes to the next.
    Blocks without rows travel nowhere. ``busy[g][s]`` (optional) says whether
    group rank ``g`` computes at step ``s``, to place transfers (:class:`Pace`).
    Returns the block of the last step, which :func:`rotate_back` starts from.
    """
    comm = RingComm(group)
    pace = Pace(busy, comm, range(len(rows)))
    for step in range(len(rows)):
        incoming = None
        if step + 1 < len(rows):
            incoming = resized(held, rows[step + 1], dim)
            pace.send_recv(step, held, incoming)
            comm.commit()
        visit(step, held)
        comm.commit(late=True)
        comm.wait()
        if incoming is not None:
            held = incoming
    return held


def rotate_back(
    group: dist.ProcessGroup,
    own: torch.Tensor,
    rows: list[int],
    dim: int,
    visit: Callable[[int, torch.Tensor], Sequence[torch.Tensor] | None],
    acc_dtype: torch.dtype,
    last: torch.Tensor | None = None,
    busy: Sequence[Sequence[bool]] | None = None,
) -> torch.Tensor:
    """The backward twin of :func:`rotate`: the blocks come round again in reverse, each with a gradient accumulator.

    ``rows`` is what :func:`rotate` got. The steps run backwards, ``s = P-1 ..
    0``, and blocks travel the other way (from the next rank to the previous):
    the first is the block :func:`rotate` returned (pass it as ``last``, else
    it is fetched from the next rank), the final one this rank's ``own``.
    ``visit(s, block)`` returns this rank's gradient of the block as parts
    along dim 0 (a tensor shaped like the block, or e.g. ``(dK, dV)``), or
    ``None`` for none. Each block's accumulator (``acc_dtype``) travels with
    it and every rank adds to it; it is complete when it reaches the owner at
    step 0, so no transfer follows the last kernel. ``busy`` is :func:`rotate`'s.
    Returns the accumulator of ``own``.
    """
    size = len(rows)
    comm = RingComm(group, reverse=True)
    pace = Pace(busy, comm, range(size - 1, -1, -1))
    if size == 1:
        last = own
    elif last is None:
        last = resized(own, rows[-1], dim)
        comm.send_recv(own, last)
        comm.commit()
        comm.wait()
    held, done = last, None  # done: the complete-so-far accumulator of the block visited before
    for step in range(size - 1, -1, -1):
        incoming = grad_in = None
        if step >= 2:  # the block of step - 1 travels; at step 0 it is this rank's own
            incoming = resized(held, rows[step - 1], dim)
            pace.send_recv(step, held, incoming)
        if done is not None:
            grad_in = resized(held, rows[step], dim, acc_dtype)
            pace.send_recv(step, done, grad_in)
        comm.commit()
        grad = visit(step, held)
        comm.commit(late=True)
        comm.wait()
        done = _add_parts(grad_in, grad, held, acc_dtype)
        held = incoming if step >= 2 else own
    return done


def _add_parts(
    acc: torch.Tensor | None, parts: Sequence[torch.Tensor] | None, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``acc + stack(parts)`` in place; a new accumulator shaped like ``like`` when ``acc`` is None."""
    if parts is None:
        return torch.zeros_like(like, dtype=dtype) if acc is None else acc
    if acc is None:
        acc = like.new_empty(like.shape, dtype=dtype)
        for a, part in zip(acc, parts, strict=True):
            a.copy_(part)
    else:
        for a, part in zip(acc, parts, strict=True):
            a.add_(part)
    return acc
