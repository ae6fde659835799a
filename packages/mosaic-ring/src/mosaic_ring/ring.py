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

import torch

from mosaic.backend import Backend, Capabilities
from mosaic.blockwise import Partial, accumulate, block_grads, span_attention
from mosaic.comm import rotate, rotate_back
from mosaic.kernels import lse_dtype
from mosaic.problem import AttentionProblem


class RingBackend(Backend):
    """Ring (P2P) sequence parallelism with O(N/P) memory."""

    name = "ring"
    capabilities = Capabilities()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        p = problem
        if p.size == 1:
            return span_attention(q, k, v, p.q_spans, p.kv_spans(), causal=p.causal, kv_len=p.kv_len, scale=p.scale)
        return RingAttention.apply(q, k, v, p)


def _origins(p: AttentionProblem) -> list[int]:
    """Owner of the block this rank holds at each step."""
    return [(p.rank - step) % p.size for step in range(p.size)]


def _busy(p: AttentionProblem, rows: list[int]) -> list[list[bool]]:
    """``[g][s]``: rank ``g`` has queries and a non-empty key block at step ``s`` (places transfers).

    ``rows[s]``: rows of the block this rank holds at step ``s``, i.e. of rank ``rank - s``.
    """
    keys = [rows[(p.rank - r) % p.size] for r in range(p.size)]
    queries = [sum(b - a for a, b in p.q_layout.spans(r)) for r in range(p.size)]
    return [[queries[g] > 0 and keys[(g - s) % p.size] > 0 for s in range(p.size)] for g in range(p.size)]


# K and V travel stacked as (2, batch, kv_heads, rows, head_dim).
_ROWS = 3


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: AttentionProblem):
        q = q.contiguous()  # once here, not in every step's kernel call
        blocks = [p.kv_block(origin) for origin in _origins(p)]
        mine = blocks[0]
        partial, steps = Partial(q), []

        def visit(step: int, held: torch.Tensor) -> None:
            steps.append(accumulate(q, held[0], held[1], p.q_spans, blocks[step].spans, p.causal, p.scale, partial))

        # The block seen last is kept: the backward starts from it without a transfer.
        rows = [b.size for b in blocks]
        busy = _busy(p, rows)
        held = torch.stack([mine.take(k), mine.take(v)])
        last = rotate(p.group, held, rows, _ROWS, visit, busy)
        out, lse = partial.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, last)
        ctx.problem, ctx.steps, ctx.busy, ctx.rows = p, steps, busy, rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, last = ctx.saved_tensors
        dout = dout.contiguous()
        p: AttentionProblem = ctx.problem
        mine = p.kv_block(p.rank)
        dq = torch.zeros(q.shape, dtype=lse_dtype(q.dtype), device=q.device)

        def visit(step: int, held: torch.Tensor):
            return block_grads(dout, q, held[0], held[1], out, lse, *ctx.steps[step], p.scale, dq)

        own = torch.stack([mine.take(k), mine.take(v)])
        grad = rotate_back(p.group, own, ctx.rows, _ROWS, visit, dq.dtype, last, ctx.busy)
        dk = mine.put(grad[0].to(k.dtype), k) if mine.size else torch.zeros_like(k)
        dv = mine.put(grad[1].to(v.dtype), v) if mine.size else torch.zeros_like(v)
        return dq.to(q.dtype), dk, dv, None
