"""``ring``: K/V blocks travel around the sp group while each rank attends to them.

Forward: at step ``s`` rank ``r`` holds the key block that started on rank
``r - s``, sends it on to ``r + 1`` and receives the next from ``r - 1``
while it computes (double-buffered ``batch_isend_irecv``); partial results are
merged with their log-sum-exp in fp32. Backward: the blocks go round again
the other way, in reverse order, each with an fp32 accumulator of its dK/dV
that every rank adds to; it starts from the block the forward kept last and
ends with each rank's own, so the accumulators are complete on their owners
without a last transfer. dQ accumulates locally. Kernels' backwards get the
final ``out``/``lse``, so nothing is recomputed and no score matrix exists.

Only key rows below ``kv_len`` travel; a block with none is neither sent nor
computed. Causal attention balances with the zigzag layout
(``layout="zigzag"``, inputs sharded by ``ctx.shard(x, dim, "zigzag")``).

Per rank: communication ``(P-1)/P * N' * 2 * Hkv * d`` elements in the
forward (``N'`` = keys kept), twice that plus the fp32 dK/dV in the backward;
memory ``O(N/P)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    Capabilities,
    Cost,
    KeyBlock,
    Partial,
    Pass,
    Piece,
    Plan,
    accumulate,
    attention_passes,
    block_grads,
    blocks,
    lse_dtype,
    rotate,
    rotate_back,
    span_plan,
)

__all__ = ["RingBackend", "RingPlan", "ring_cost"]

# K and V travel stacked as (2, batch, kv_heads, rows, head_dim).
_ROWS = 3


class RingBackend(Backend):
    """Ring (P2P) sequence parallelism with O(N/P) memory."""

    name = "ring"
    capabilities = Capabilities()

    def plan(self, problem: AttentionProblem) -> Plan:
        p = problem
        if p.size == 1:
            return span_plan(p)
        origins = [(p.rank - step) % p.size for step in range(p.size)]
        blocks_held = tuple(p.kv_block(origin) for origin in origins)
        spec = p.block_spec()
        pieces = tuple(
            tuple(blocks(p.q_spans, b.spans, causal=p.causal, spec=spec)) if b.size else () for b in blocks_held
        )
        rows = tuple(b.size for b in blocks_held)
        return RingPlan(p, ring_cost(p), blocks_held, pieces, rows, _busy(p, list(rows)))


def _busy(p: AttentionProblem, rows: list[int]) -> tuple[tuple[bool, ...], ...]:
    """``[g][s]``: rank ``g`` has queries and a non-empty key block at step ``s`` (places transfers).

    ``rows[s]``: rows of the block this rank holds at step ``s``, i.e. of rank ``rank - s``.
    """
    keys = [rows[(p.rank - r) % p.size] for r in range(p.size)]
    queries = [sum(b - a for a, b in p.q_layout.spans(r)) for r in range(p.size)]
    return tuple(tuple(queries[g] > 0 and keys[(g - s) % p.size] > 0 for s in range(p.size)) for g in range(p.size))


def ring_cost(p: AttentionProblem) -> Cost:
    """The busiest rank: all other ranks' kept keys arrive in the forward; in the backward the keys again and
    their fp32 dK/dV accumulators; every transfer is double-buffered under a step's kernels."""
    e = torch.empty((), dtype=p.dtype).element_size()
    f = torch.empty((), dtype=lse_dtype(p.dtype)).element_size()
    kept = [p.kv_block(r).size for r in range(p.size)]
    width = p.batch * 2 * p.kv_heads * p.head_dim
    foreign = sum(kept) - min(kept)
    forward, backward = attention_passes(p.batch, p.heads, p.head_dim, p.busiest_pairs())
    return Cost(
        Pass(forward, width * foreign * e, 1.0, p.size - 1),
        Pass(backward, width * foreign * (e + f), 1.0, p.size - 1),
        memory=2 * width * max(kept) * (e + f),
    )


@dataclass(frozen=True)
class RingPlan(Plan):
    """The ring schedule of one rank: the key block held at each step and its pieces."""

    held: tuple[KeyBlock, ...]  # step s: the block of rank (rank - s), rows below kv_len
    pieces: tuple[tuple[Piece, ...], ...]
    rows: tuple[int, ...]
    busy: tuple[tuple[bool, ...], ...]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return RingAttention.apply(q, k, v, self)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        p = plan.problem
        q = q.contiguous()  # once here, not in every step's kernel call
        mine = plan.held[0]
        partial, calls = Partial(q), []

        def visit(step: int, held: torch.Tensor) -> None:
            calls.append(accumulate(q, held[0], held[1], plan.pieces[step], p.scale, partial))

        # The block seen last is kept: the backward starts from it without a transfer.
        held = torch.stack([mine.take(k), mine.take(v)])
        last = rotate(p.group, held, list(plan.rows), _ROWS, visit, plan.busy)
        out, lse = partial.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, last)
        ctx.plan, ctx.calls = plan, calls
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, last = ctx.saved_tensors
        dout = dout.contiguous()
        plan: RingPlan = ctx.plan
        p = plan.problem
        mine = plan.held[0]
        dq = torch.zeros(q.shape, dtype=lse_dtype(q.dtype), device=q.device)

        def visit(step: int, held: torch.Tensor):
            return block_grads(dout, q, held[0], held[1], out, lse, list(plan.pieces[step]), ctx.calls[step],
                               p.scale, dq)  # fmt: skip

        own = torch.stack([mine.take(k), mine.take(v)])
        grad = rotate_back(p.group, own, list(plan.rows), _ROWS, visit, dq.dtype, last, plan.busy)
        dk = mine.put(grad[0].to(k.dtype), k) if mine.size else torch.zeros_like(k)
        dv = mine.put(grad[1].to(v.dtype), v) if mine.size else torch.zeros_like(v)
        return dq.to(q.dtype), dk, dv, None
