"""``switch``: move the sharding from the attention dim to the folded batch for one attention, then back.

FastFold's Dynamic Axial Parallelism and DSP (video) keep a tensor sharded
along one dim and, for attention over that dim, switch the sharding to
another dim with one all-to-all, attend locally over whole sequences, and
switch back. Here the other dims are the folded batch ``B'`` (TabPFN's
tables x columns for row attention, video's frames x pixels):

    before           rank r: every batch entry, its rows of the sequence   (B', H, n_r, d)
    all-to-all  ->   rank r: its batch entries, every row, position order (B'_r, H, N, d)
    attention        whole sequences, one block plan over global positions
    all-to-all  ->   rank r: every batch entry, its rows again             (B', H, n_r, d)

Forward: one all-to-all carries q and the key rows below ``kv_len`` (k, v)
to the rank that owns their batch entry; the received rows are put in global
position order, so :func:`mosaic.blockwise.blocks` plans the attention over
positions (causal is one diagonal block for any layout, cross-attention and
grouped kv heads need nothing more); a second all-to-all returns the output
rows to their owners. Backward mirrors it: dout travels like q, the kernels'
backwards run on the whole sequences, and one all-to-all returns dq, dk, dv.
Each key's gradient is computed on one rank only, so nothing is summed across
ranks and gradients travel in the input dtype.

The batch split follows ``torch.tensor_split``: with ``D`` entries to
redistribute, the first ``D % P`` ranks get one more, and ranks past ``D``
get none (they compute nothing; the sequence is never padded). Option
``dims`` picks which folded dims are redistributed (indices into the batch
shape: the tensor's dims without the attention dim and embed); the others
stay whole on every rank. Heads are never split, so unlike ``ulysses`` no
head count has to divide the group.

Per rank ``r`` holding ``n_r`` query rows and ``m_r`` key rows below
``kv_len``, with ``b_r`` of the ``B'`` batch entries after the switch
(elements; :func:`switch_traffic` is the exact count in bytes):

- forward: ``b_r * sum_{i != r} (H n_i + 2 Hkv m_i) * d`` in, plus
  ``(B' - b_r) * H n_r * d`` (the output rows) back;
- backward: ``b_r * sum_{i != r} H n_i * d`` (dout) in, plus
  ``(B' - b_r) * (H n_r + 2 Hkv m_r) * d`` (dq, dk, dv) back;
- evenly split, ``4 (P-1)/P^2 * B' * (H N + Hkv N') * d`` in all, whatever the
  attention's ``N^2``;
- memory: the switched q, k, v and output, ``O(N * B'/P * (H + Hkv) * d)``,
  kept for the backward with the fp32 log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    Capabilities,
    Cost,
    KeyBlock,
    Options,
    Pass,
    Plan,
    Span,
    all_to_all_uneven,
    attention_passes,
    blockwise,
    lse_dtype,
    span_plan,
    split_sizes,
)

from .exchange import merge_spans

__all__ = ["BatchSplit", "Positions", "SwitchBackend", "SwitchOptions", "SwitchPlan", "batch_split", "switch_traffic"]

Run = tuple[int, int]  # (first row, row count)
Shape = tuple[int, ...]


@dataclass(frozen=True)
class SwitchOptions(Options):
    """Options of ``switch``.

    Args:
        dims: the folded dims whose entries are redistributed over the group, as indices
            into the batch shape (the tensor's dims without the attention dim and embed;
            negative counts from the end; the order given does not matter). ``None``
            (default): all of batch'. The other folded dims stay whole on every rank.
    """

    dims: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dims is None:
            return
        dims = self.dims
        if not isinstance(dims, tuple | list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dims):
            raise ValueError(f"option dims must be a tuple of ints (indices into the folded dims), got {dims!r}")
        if not dims:
            raise ValueError("option dims must name at least one folded dim, got (); use None for all of batch'")
        if len(set(dims)) != len(dims):
            raise ValueError(f"option dims names a dim twice: {dims!r}")
        object.__setattr__(self, "dims", tuple(dims))


@dataclass(frozen=True)
class BatchSplit:
    """How batch' is regrouped and cut over the group.

    ``shape`` is the batch shape the split reads, ``order`` its dims with the
    redistributed ones first; batch' seen in that order is ``(D, K)``: ``D``
    entries to redistribute, of which rank ``r`` gets ``parts[r]``, each with
    ``K`` (``kept``) entries of the dims that stay whole.
    """

    shape: Shape
    order: tuple[int, ...]
    parts: tuple[int, ...]
    kept: int

    @property
    def moved(self) -> int:
        return sum(self.parts)

    def bounds(self, rank: int) -> slice:
        start = sum(self.parts[:rank])
        return slice(start, start + self.parts[rank])

    def regroup(self, t: torch.Tensor) -> torch.Tensor:
        """``(B', h, rows, d)`` -> ``(D, K, h, rows, d)`` (a view unless ``order`` permutes the dims)."""
        tail = tuple(range(len(self.shape), len(self.shape) + 3))
        grouped = t.reshape(*self.shape, *t.shape[1:]).permute(*self.order, *tail)
        return grouped.reshape(self.moved, self.kept, *t.shape[1:])

    def ungroup(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`regroup`."""
        inverse = tuple(sorted(range(len(self.order)), key=self.order.__getitem__))
        tail = tuple(range(len(self.shape), len(self.shape) + 3))
        moved = t.reshape(*(self.shape[i] for i in self.order), *t.shape[2:]).permute(*inverse, *tail)
        return moved.reshape(math.prod(self.shape), *t.shape[2:])


def _normalised_dims(problem: AttentionProblem) -> tuple[tuple[int, ...] | None, list[str]]:
    """The option's dims as non-negative indices into the batch shape, or why they can't be."""
    dims, shape = problem.options.dims, problem.batch_shape
    if dims is None:
        return None, []
    if math.prod(shape) != problem.batch or not shape:
        return None, [
            f"option dims={dims} needs the folded batch shape, but this call gives {shape} for batch' "
            f"{problem.batch}; call through MultiAxisAttention, or leave dims=None"
        ]
    bad = [i for i in dims if not -len(shape) <= i < len(shape)]
    if bad:
        return None, [f"option dims={dims}: {bad} out of range for the {len(shape)} folded dims {shape}"]
    normal = tuple(sorted(i % len(shape) for i in dims))
    if len(set(normal)) != len(normal):
        return None, [f"option dims={dims} names one of the folded dims {shape} twice"]
    return normal, []


def batch_split(problem: AttentionProblem) -> BatchSplit:
    """The batch split of ``problem`` (which its options' dims must fit)."""
    dims, reasons = _normalised_dims(problem)
    if reasons:
        raise ValueError(reasons[0])
    if dims is None:
        return BatchSplit((problem.batch,), (0,), tuple(split_sizes(problem.batch, problem.size)), 1)
    shape = problem.batch_shape
    rest = tuple(i for i in range(len(shape)) if i not in dims)
    moved = math.prod(shape[i] for i in dims)
    return BatchSplit(shape, dims + rest, tuple(split_sizes(moved, problem.size)), problem.batch // moved)


@dataclass(frozen=True)
class Positions:
    """The rows of every rank put in global position order, and the way back.

    Args:
        lengths: rows per rank.
        order: ``(rank, first local row, count)`` runs, in position order.
        owned: per rank, ``(first row in position order, count)`` runs, in its local order.
        spans: the positions of the ordered rows (sorted, adjacent spans joined).
    """

    lengths: tuple[int, ...]
    order: tuple[tuple[int, int, int], ...]
    owned: tuple[tuple[Run, ...], ...]
    spans: tuple[Span, ...]

    @classmethod
    def of(cls, rank_spans: Sequence[tuple[Span, ...]]) -> Positions:
        held = []  # (start, rank, first local row, count)
        for r, spans in enumerate(rank_spans):
            row = 0
            for a, b in spans:
                if b > a:
                    held.append((a, r, row, b - a))
                row += b - a
        order: list[list[int]] = []
        placed = {}  # (rank, first local row) -> its row in position order
        row = 0
        for _, r, local, n in sorted(held):
            if order and order[-1][0] == r and order[-1][1] + order[-1][2] == local:
                order[-1][2] += n
            else:
                order.append([r, local, n])
            placed[(r, local)] = row
            row += n
        owned: list[list[list[int]]] = [[] for _ in rank_spans]
        for _, r, local, n in sorted(held, key=lambda h: (h[1], h[2])):
            at = placed[(r, local)]
            runs = owned[r]
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1][1] += n
            else:
                runs.append([at, n])
        return cls(
            tuple(sum(b - a for a, b in spans) for spans in rank_spans),
            tuple((r, local, n) for r, local, n in order),
            tuple(tuple((a, n) for a, n in runs) for runs in owned),
            merge_spans([s for spans in rank_spans for s in spans]),
        )

    def gather(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every rank's rows (``parts[r]``, rows along dim -2) in position order."""
        pieces = [parts[r].narrow(-2, local, n) for r, local, n in self.order]
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return parts[0].narrow(-2, 0, 0)
        return torch.cat(pieces, -2)

    def rows_of(self, t: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """Rank ``rank``'s rows of the position-ordered ``t``, in its local order (to be joined)."""
        return [t.narrow(-2, a, n) for a, n in self.owned[rank]]


# One tensor for one rank: its shape and the pieces that fill it, joined along dim -2.
Item = tuple[Shape, list[torch.Tensor]]


def _swap(
    group: dist.ProcessGroup, payload: list[list[Item]], arriving: list[list[Shape]], like: torch.Tensor
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """One all-to-all: the items of ``payload[j]`` go to rank ``j``, in order.

    Returns what arrived, flat (senders in rank order), and per sender ``i`` its
    tensors as views shaped ``arriving[i]``. The pieces are copied once,
    straight into the send buffer, which holds every rank's items one after
    another as the uneven ``all_to_all_single`` wants them.
    """
    send = [sum(math.prod(shape) for shape, _ in items) for items in payload]
    buffer = like.new_empty(sum(send))
    offset = 0
    for items in payload:
        for shape, pieces in items:
            segment = buffer[offset : offset + math.prod(shape)].view(shape)
            row = 0
            for piece in pieces:
                segment.narrow(-2, row, piece.shape[-2]).copy_(piece)
                row += piece.shape[-2]
            offset += math.prod(shape)
    recv = [sum(math.prod(shape) for shape in shapes) for shapes in arriving]
    flat = all_to_all_uneven(buffer, send, recv, 0, group)
    views, offset = [], 0
    for shapes in arriving:
        views.append([])
        for shape in shapes:
            views[-1].append(flat[offset : offset + math.prod(shape)].view(shape))
            offset += math.prod(shape)
    return flat, views


class SwitchBackend(Backend):
    """Axis switching (DAP / DSP): all-to-all to batch sharding, attention over whole sequences, all-to-all back."""

    name = "switch"
    capabilities = Capabilities()
    Options = SwitchOptions

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        return _normalised_dims(problem)[1]

    def plan(self, problem: AttentionProblem) -> Plan:
        p = problem
        if p.size == 1:
            return span_plan(p)
        split = batch_split(p)
        q_pos = Positions.of([p.q_layout.spans(r) for r in range(p.size)])
        kv_pos = Positions.of([p.kv_block(r).spans for r in range(p.size)])
        # Keys are already cut to kv_len; the positions make causal and cross-attention exact.
        pieces = tuple(blockwise.blocks(q_pos.spans, kv_pos.spans, causal=p.causal, spec=p.block_spec()))
        return SwitchPlan(p, switch_cost(p, split), split, q_pos, kv_pos, p.kv_block(), pieces)


def switch_traffic(problem: AttentionProblem, rank: int | None = None) -> tuple[int, int]:
    """Bytes that reach ``rank`` (default this one) through ``switch``'s all-to-alls: ``(forward, backward)``.

    Forward: q, k, v rows of this rank's batch entries from every other rank,
    then the output of this rank's rows from the ranks that computed them.
    Backward: dout like q, then dq, dk, dv like the output. Gradients travel in
    the input dtype (no rank sums another's). Zero on a group of one.
    """
    p = problem
    r = p.rank if rank is None else rank
    if p.size == 1:
        return 0, 0
    split = batch_split(p)
    e = torch.empty((), dtype=p.dtype).element_size()
    q = [p.heads * n for n in p.q_layout.lengths]
    kv = [2 * p.kv_heads * p.kv_block(i).size for i in range(p.size)]
    mine, others = split.parts[r], split.moved - split.parts[r]
    unit = split.kept * p.head_dim * e
    foreign_q = sum(q) - q[r]
    forward = mine * (foreign_q + sum(kv) - kv[r]) + others * q[r]
    backward = mine * foreign_q + others * (q[r] + kv[r])
    return forward * unit, backward * unit


def switch_cost(problem: AttentionProblem, split: BatchSplit) -> Cost:
    """The busiest rank: the most batch entries to compute, the most bytes to receive."""
    p = problem
    e = torch.empty((), dtype=p.dtype).element_size()
    busiest = max(split.parts) * split.kept
    keys = sum(p.kv_block(r).size for r in range(p.size))
    pairs = sum(p.pairs(r) for r in range(p.size))
    queries = p.q_layout.total
    # Kept for the backward: the switched q, k, v and output, and the fp32 (fp64) log-sum-exp.
    lse = torch.empty((), dtype=lse_dtype(p.dtype)).element_size()
    memory = busiest * (p.head_dim * e * (2 * p.heads * queries + 2 * p.kv_heads * keys) + lse * p.heads * queries)
    forward, backward = attention_passes(busiest, p.heads, p.head_dim, pairs)
    traffic = [switch_traffic(p, r) for r in range(p.size)]
    return Cost(
        Pass(forward, max(t[0] for t in traffic), 0.0, 2),
        Pass(backward, max(t[1] for t in traffic), 0.0, 2),
        memory=memory,
    )


@dataclass(frozen=True)
class SwitchPlan(Plan):
    """The batch split, where every rank's rows land in position order, and the blocks over whole sequences."""

    traceable: ClassVar[bool] = True  # its collectives trace into a compiled graph

    split: BatchSplit
    q_pos: Positions
    kv_pos: Positions
    mine: KeyBlock  # this rank's keys below kv_len
    pieces: tuple[blockwise.Piece, ...]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return SwitchAttention.apply(q, k, v, self)

    @property
    def local_batch(self) -> int:
        """Batch entries this rank computes after the switch."""
        return self.split.parts[self.problem.rank] * self.split.kept

    def arriving_rows(self, heads: Sequence[tuple[int, Positions]]) -> list[list[Shape]]:
        """Per sender ``i``: ``(local batch, h, rows of i, d)`` for each ``(h, positions)``."""
        d, b = self.problem.head_dim, self.local_batch
        return [[(b, h, pos.lengths[i], d) for h, pos in heads] for i in range(self.problem.size)]

    def arriving_batch(self, heads: Sequence[tuple[int, int]]) -> list[list[Shape]]:
        """Per sender ``j``: ``(entries of j, K, h, rows, d)`` for each ``(h, rows)`` this rank holds."""
        s, d = self.split, self.problem.head_dim
        return [[(s.parts[j], s.kept, h, n, d) for h, n in heads] for j in range(self.problem.size)]

    def to_batch(self, tensors: Sequence[torch.Tensor]) -> list[list[Item]]:
        """Payloads that send every rank its batch entries of each ``(B', h, rows, d)`` tensor."""
        grouped = [self.split.regroup(t) for t in tensors]
        payload = []
        for j in range(self.problem.size):
            parts = [g[self.split.bounds(j)] for g in grouped]
            payload.append([(tuple(part.shape), [part]) for part in parts])
        return payload

    def to_owners(self, tensors: Sequence[tuple[torch.Tensor, Positions]]) -> list[list[Item]]:
        """Payloads that send every rank its rows of each position-ordered ``(local batch, h, N, d)`` tensor."""
        return [
            [((t.shape[0], t.shape[1], pos.lengths[i], t.shape[3]), pos.rows_of(t, i)) for t, pos in tensors]
            for i in range(self.problem.size)
        ]

    def from_batch(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B', h, rows, d)`` from every rank's ``(entries, K, h, rows, d)`` part, in rank order."""
        return self.split.ungroup(torch.cat(list(parts)))


class SwitchAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: SwitchPlan):
        p = plan.problem
        h, hkv, n = p.heads, p.kv_heads, q.shape[2]
        mine = plan.mine
        # q, k and v travel in one all-to-all; k and v only below kv_len.
        payload = plan.to_batch([q, mine.take(k), mine.take(v)])
        arriving = plan.arriving_rows([(h, plan.q_pos), (hkv, plan.kv_pos), (hkv, plan.kv_pos)])
        _, got = _swap(p.group, payload, arriving, q)
        # Kernels want rows contiguous; a gather of several runs already is.
        qs = plan.q_pos.gather([g[0] for g in got]).contiguous()
        ks = plan.kv_pos.gather([g[1] for g in got]).contiguous()
        vs = plan.kv_pos.gather([g[2] for g in got]).contiguous()
        if plan.local_batch:
            out, lse, calls = blockwise.forward(qs, ks, vs, list(plan.pieces), p.scale)
            out = out.to(q.dtype)
        else:  # no batch entry here: nothing to compute, but this rank's collectives still run
            out, lse, calls = qs.new_empty(qs.shape), qs.new_empty(qs.shape[:3], dtype=lse_dtype(q.dtype)), []
        flat, _ = _swap(p.group, plan.to_owners([(out, plan.q_pos)]), plan.arriving_batch([(h, n)]), q)
        ctx.save_for_backward(qs, ks, vs, out, lse)
        ctx.plan, ctx.calls, ctx.kv_like = plan, calls, (k.shape, k.dtype, v.shape, v.dtype)
        # The parts arrive in rank order, so the buffer already is (D, K, H, n, d): no copy when dims=None.
        s = plan.split
        return s.ungroup(flat.view(s.moved, s.kept, h, n, q.shape[3]))

    @staticmethod
    def backward(ctx, dout):
        qs, ks, vs, out, lse = ctx.saved_tensors
        plan: SwitchPlan = ctx.plan
        p = plan.problem
        k_shape, k_dtype, v_shape, v_dtype = ctx.kv_like
        h, hkv, n, m = p.heads, p.kv_heads, dout.shape[2], plan.mine.size
        _, got = _swap(p.group, plan.to_batch([dout]), plan.arriving_rows([(h, plan.q_pos)]), dout)
        douts = plan.q_pos.gather([g[0] for g in got]).contiguous()
        if plan.local_batch:
            dq, dk, dv = blockwise.backward(douts, qs, ks, vs, out, lse, list(plan.pieces), ctx.calls, p.scale)
        else:
            dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(ks), torch.zeros_like(vs)
        # Every key's gradient is complete here (no other rank saw its batch entry): it travels as it is.
        payload = plan.to_owners([(dq, plan.q_pos), (dk, plan.kv_pos), (dv, plan.kv_pos)])
        _, back = _swap(p.group, payload, plan.arriving_batch([(h, n), (hkv, m), (hkv, m)]), dout)
        dq = plan.from_batch([b[0] for b in back])
        like_k, like_v = dq.new_empty(k_shape, dtype=k_dtype), dq.new_empty(v_shape, dtype=v_dtype)
        dk = plan.mine.put(plan.from_batch([b[1] for b in back]), like_k) if m else torch.zeros_like(like_k)
        dv = plan.mine.put(plan.from_batch([b[2] for b in back]), like_v) if m else torch.zeros_like(like_v)
        return dq, dk, dv, None
