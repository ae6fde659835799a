"""``ring``: K/V blocks travel around the sp group while each rank attends to them.

Forward: at step ``s`` rank ``r`` holds the key block that started on rank
``r - s``, sends it on to ``r + 1`` and receives the next from ``r - 1``
while it computes (double-buffered ``batch_isend_irecv``); partial results are
merged with their log-sum-exp in fp32. Backward: the blocks go round again,
each with an fp32 accumulator of its dK/dV that every rank adds to and that
finally returns to the owner; dQ accumulates locally. Kernels' backwards get
the final ``out``/``lse``, so nothing is recomputed and no score matrix exists.

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
from mosaic.blockwise import accumulate, backward_, empty_partial, span_attention
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


# K and V travel stacked as (2, batch, kv_heads, rows, head_dim).
_ROWS = 3


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: AttentionProblem):
        q = q.contiguous()  # once here, not in every step's kernel call
        blocks = [p.kv_block(origin) for origin in _origins(p)]
        mine = blocks[0]
        out, lse = empty_partial(q)
        steps = []

        def visit(step: int, held: torch.Tensor) -> None:
            steps.append(accumulate(q, held[0], held[1], p.q_spans, blocks[step].spans, p.causal, p.scale, out, lse))

        rotate(p.group, torch.stack([mine.take(k), mine.take(v)]), [b.size for b in blocks], _ROWS, visit)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.steps = p, steps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        p: AttentionProblem = ctx.problem
        blocks = [p.kv_block(origin) for origin in _origins(p)]
        mine = blocks[0]
        acc = lse_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)

        def visit(step: int, held: torch.Tensor) -> torch.Tensor:
            grad = torch.zeros(held.shape, dtype=acc, device=held.device)
            pieces, calls = ctx.steps[step]
            if pieces:
                backward_(dout, q, held[0], held[1], out, lse, pieces, calls, p.scale, dq, grad[0], grad[1])
            return grad

        held = torch.stack([mine.take(k), mine.take(v)])
        own = rotate_back(p.group, held, [b.size for b in blocks], _ROWS, visit, acc)
        dk = mine.put(own[0].to(k.dtype), k) if mine.size else torch.zeros_like(k)
        dv = mine.put(own[1].to(v.dtype), v) if mine.size else torch.zeros_like(v)
        return dq.to(q.dtype), dk, dv, None
