"""Two-level attention: an outer strategy over the rails, an inner one within each node.

Rank ``(n, l)`` owns key block ``B(n, l)`` (its rows below ``kv_len``). The
outer level decides what each rank *holds* at each outer step:

- ``ring``: ``nodes`` steps; at step ``j`` rank ``(n, l)`` holds
  ``B(n - j, l)``, which came over its rail from ``(n - 1, l)``, and passes it
  on to ``(n + 1, l)`` while the step runs (double-buffered).
- ``allgather``: one step; every rank holds ``B(0..nodes-1, l)``, gathered
  over its rail.

The inner level makes every rank of the node attend its queries to what the
whole node holds at that step:

- ``ring``: the ``L`` holdings rotate around the node, double-buffered.
- ``allgather``: the holdings are gathered within the node.

ring/ring is LoongTrain's double ring: the next block crosses between nodes
while the inner ring runs, and partial results merge with their log-sum-exp
(fp32). After the outer steps every rank has seen every key block once.

Backward runs the schedule in reverse (:func:`mosaic.comm.rotate_back`: rings
turn the other way and end on each rank's own block). The inner level returns
the gradient of what this rank holds (the inner ring carries fp32 dK/dV
accumulators to their holder; the inner all-gather reduce-scatters them); the
outer ring carries that accumulator along the rail to the block's owner,
starting from the rail block the forward kept last; the outer all-gather
reduce-scatters it. Inner all-gathers are repeated in backward under an outer
ring (keeping them would cost O(N) memory) and kept under an outer all-gather.

``kv_len``: only rows below it exist in the blocks; an empty holding is
neither sent nor computed. Causal: :func:`mosaic.blockwise.blocks` gives exact
pieces for any spans; balance comes from the zigzag layout over the whole sp
group, under which every (query rank, key rank) pair costs the same, so every
step of either level is balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic.sdk import (
    AttentionProblem,
    KernelCall,
    KeyBlock,
    Partial,
    Piece,
    Plan,
    Span,
    accumulate,
    all_gather_uneven,
    block_grads,
    blocks,
    lse_dtype,
    reduce_scatter_uneven,
    resized,
    rotate,
    rotate_back,
)

from .options import HierOptions
from .topology import Topology

# K and V travel stacked as (2, batch, kv_heads, rows, head_dim); rows are dim 3.
ROWS = 3

Step = tuple[list[Piece], list[KernelCall | None]]

__all__ = ["HierPlan", "Holding", "holdings"]


@dataclass(frozen=True)
class Holding:
    """Key positions a rank holds at one outer step, in local row order."""

    spans: tuple[Span, ...]
    size: int


def holdings(p: AttentionProblem, topo: Topology, inter: str) -> list[list[Holding]]:
    """For each outer step, what each local rank of this node holds (indexed by local rank)."""
    blocks = [p.kv_block(r) for r in range(p.size)]

    def rail(local_rank: int, nodes: list[int]) -> Holding:
        parts = [blocks[topo.rank_of(node, local_rank)] for node in nodes]
        return Holding(tuple(s for b in parts for s in b.spans), sum(b.size for b in parts))

    if inter == "allgather":
        return [[rail(lr, list(range(topo.nodes))) for lr in range(topo.local)]]
    return [[rail(lr, [(topo.node - j) % topo.nodes]) for lr in range(topo.local)] for j in range(topo.nodes)]


@dataclass(frozen=True)
class HierPlan(Plan):
    """The two-level schedule of one rank: its place, what every rank of its node holds at each
    outer step, and the pieces of every block of key positions it will attend to."""

    topo: Topology
    options: HierOptions
    schedule: tuple[tuple[Holding, ...], ...]
    pieces: dict[tuple[Span, ...], tuple[Piece, ...]]
    mine: KeyBlock
    rail: tuple[int, ...]  # key rows of each rank of this rank's rail

    @classmethod
    def of(cls, p: AttentionProblem, topo: Topology, opts: HierOptions, cost) -> HierPlan:
        schedule = tuple(tuple(node) for node in holdings(p, topo, opts.inter_node_strategy))
        if opts.intra_node_strategy == "allgather":
            seen = {tuple(s for h in node for s in h.spans) for node in schedule}
        else:
            seen = {h.spans for node in schedule for h in node}
        pieces = {spans: tuple(blocks(p.q_spans, spans, causal=p.causal, spec=p.block_spec())) for spans in seen}
        rail = tuple(p.kv_block(topo.rank_of(node, topo.local_rank)).size for node in range(topo.nodes))
        return cls(p, cost, topo, opts, schedule, pieces, p.kv_block(p.rank), rail)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return HierarchicalAttentionFunction.apply(q, k, v, self)


def _attend(plan: HierPlan, q, kv, spans, partial: Partial) -> Step:
    """Fold the local queries' attention to ``kv`` (at ``spans``) into ``partial``."""
    pieces = list(plan.pieces[spans])
    return pieces, accumulate(q, kv[0], kv[1], pieces, plan.problem.scale, partial)


def _attend_backward(plan: HierPlan, dout, q, out, lse, kv, step: Step, dq):
    """Add this step's dQ into ``dq``; return ``(dK, dV)`` of ``kv`` (unrounded), or None."""
    return block_grads(dout, q, kv[0], kv[1], out, lse, *step, plan.problem.scale, dq)


class _NodeGather:
    """Inner all-gather: gather what the node holds, attend to it, reduce-scatter dK/dV back."""

    def __init__(self, plan: HierPlan, keep: bool):
        self.p, self.topo, self.keep = plan, plan.topo, keep

    def forward(self, q, held, node: list[Holding], partial: Partial) -> tuple[list[Step], torch.Tensor | None]:
        """Merge the node's holdings into ``partial``; return what backward needs."""
        sizes = [h.size for h in node]
        if not sum(sizes):
            return [([], [])], None
        kv = all_gather_uneven(held, sizes, ROWS, self.topo.intra)
        step = _attend(self.p, q, kv, tuple(s for h in node for s in h.spans), partial)
        return [step], kv if self.keep else None

    def backward(self, dout, q, out, lse, held, node: list[Holding], saved, dq) -> torch.Tensor:
        """Add dQ into ``dq``; return the node's dK/dV for ``held`` (fp32)."""
        steps, kv = saved
        sizes = [h.size for h in node]
        if not sum(sizes):
            return resized(held, 0, ROWS, dq.dtype)
        if kv is None:
            kv = all_gather_uneven(held, sizes, ROWS, self.topo.intra)
        parts = _attend_backward(self.p, dout, q, out, lse, kv, steps[0], dq)
        grad = torch.zeros(kv.shape, dtype=dq.dtype, device=kv.device) if parts is None else torch.stack(parts)
        return reduce_scatter_uneven(grad, sizes, ROWS, self.topo.intra, dq.dtype)


class _NodeRing:
    """Inner ring: the node's holdings rotate round it; dK/dV accumulators follow them home."""

    def __init__(self, plan: HierPlan):
        self.p, self.topo = plan, plan.topo

    def _order(self, node: list[Holding]) -> list[Holding]:
        """What this rank holds at each inner step: its own holding first, then the previous ranks'."""
        local, me = self.topo.local, self.topo.local_rank
        return [node[(me - i) % local] for i in range(local)]

    def forward(self, q, held, node: list[Holding], partial: Partial) -> tuple[list[Step], None]:
        """Merge the node's holdings into ``partial``; return what backward needs."""
        order, steps = self._order(node), []
        rotate(
            self.topo.intra, held, [h.size for h in order], ROWS,
            lambda i, kv: steps.append(_attend(self.p, q, kv, order[i].spans, partial)),
        )  # fmt: skip
        return steps, None

    def backward(self, dout, q, out, lse, held, node: list[Holding], saved, dq) -> torch.Tensor:
        """Add dQ into ``dq``; return the node's dK/dV for ``held`` (fp32)."""
        steps, _ = saved
        return rotate_back(
            self.topo.intra, held, [h.size for h in self._order(node)], ROWS,
            lambda i, kv: _attend_backward(self.p, dout, q, out, lse, kv, steps[i], dq), dq.dtype,
        )  # fmt: skip


class HierarchicalAttentionFunction(torch.autograd.Function):
    """Differentiable two-level attention over ``topo`` (both levels of size >= 2)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: HierPlan):
        topo, opts, schedule = plan.topo, plan.options, plan.schedule
        # Gathered node K/V is kept for backward only when there is one outer step (O(N) memory otherwise).
        inner = (
            _NodeGather(plan, keep=len(schedule) == 1) if opts.intra_node_strategy == "allgather" else _NodeRing(plan)
        )
        mine = plan.mine
        held = torch.stack([mine.take(k), mine.take(v)])
        partial, saved = Partial(q), []
        if opts.inter_node_strategy == "allgather":
            held = all_gather_uneven(held, list(plan.rail), ROWS, topo.inter) if sum(plan.rail) else held
            ctx.rail_held = held
            saved.append(inner.forward(q, held, list(schedule[0]), partial))
        else:
            # The rail block seen last is kept: the backward's rail ring starts from it.
            ctx.rail_last = rotate(
                topo.inter, held, [node[topo.local_rank].size for node in schedule], ROWS,
                lambda j, kv: saved.append(inner.forward(q, kv, list(schedule[j]), partial)),
            )  # fmt: skip
        out, lse = partial.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.inner, ctx.saved = plan, inner, saved
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan: HierPlan = ctx.plan
        topo, schedule, inner, saved = plan.topo, plan.schedule, ctx.inner, ctx.saved
        dq = torch.zeros(q.shape, dtype=lse_dtype(q.dtype), device=q.device)
        mine = plan.mine
        if plan.options.inter_node_strategy == "allgather":
            grad = inner.backward(dout, q, out, lse, ctx.rail_held, list(schedule[0]), saved[0], dq)
            rail = list(plan.rail)
            own = reduce_scatter_uneven(grad, rail, ROWS, topo.inter) if sum(rail) else grad
        else:
            own = _outer_ring_backward(dout, q, out, lse, torch.stack([mine.take(k), mine.take(v)]), ctx, dq)
        dk = mine.put(own[0].to(k.dtype), k) if mine.size else torch.zeros_like(k)
        dv = mine.put(own[1].to(v.dtype), v) if mine.size else torch.zeros_like(v)
        return dq.to(q.dtype), dk, dv, None


def _outer_ring_backward(dout, q, out, lse, held, ctx, dq) -> torch.Tensor:
    """The rail ring of backward: blocks come round again, each with its fp32 dK/dV accumulator."""
    plan: HierPlan = ctx.plan
    topo, schedule, inner, saved = plan.topo, plan.schedule, ctx.inner, ctx.saved
    return rotate_back(
        topo.inter, held, [node[topo.local_rank].size for node in schedule], ROWS,
        lambda j, kv: inner.backward(dout, q, out, lse, kv, list(schedule[j]), saved[j], dq), dq.dtype,
        last=ctx.rail_last,
    )  # fmt: skip
