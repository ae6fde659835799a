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
from mosaic.blockwise import backward_, empty_partial, merge_, plan, span_attention
from mosaic.blockwise import forward as block_forward
from mosaic.comm import RingComm
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


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: AttentionProblem):
        q = q.contiguous()  # once here, not in every step's kernel call
        blocks = [p.kv_block(r) for r in range(p.size)]
        origins = _origins(p)
        comm = RingComm(p.group)
        mine = blocks[p.rank]
        held = torch.stack([mine.take(k), mine.take(v)]) if mine.size else None
        out, lse = empty_partial(q)
        steps = []
        for step, origin in enumerate(origins):
            incoming = None
            if step + 1 < p.size:
                nxt = blocks[origins[step + 1]]
                incoming = k.new_empty((2, *k.shape[:2], nxt.size, k.shape[3])) if nxt.size else None
                comm.send_recv(held, incoming)
                comm.commit()
            pieces = plan(p.q_spans, blocks[origin].spans, causal=p.causal) if held is not None else []
            calls = []
            if pieces:
                block_out, block_lse, calls = block_forward(q, held[0], held[1], pieces, p.scale)
                merge_(out, lse, block_out, block_lse)
            steps.append((pieces, calls))
            comm.wait()
            held = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.steps = p, steps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        p: AttentionProblem = ctx.problem
        blocks = [p.kv_block(r) for r in range(p.size)]
        origins = _origins(p)
        comm = RingComm(p.group)
        acc = lse_dtype(q.dtype)
        mine = blocks[p.rank]
        held = torch.stack([mine.take(k), mine.take(v)]) if mine.size else None
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_prev = None  # dK/dV accumulator of the block handled in the previous step
        for step, origin in enumerate(origins):
            block = blocks[origin]
            incoming = grad_in = None
            if step + 1 < p.size:
                nxt = blocks[origins[step + 1]]
                incoming = k.new_empty((2, *k.shape[:2], nxt.size, k.shape[3])) if nxt.size else None
                comm.send_recv(held, incoming)
            if step > 0:
                # The previous block's accumulator goes on; this block's arrives from behind.
                grad_in = torch.empty((2, *k.shape[:2], block.size, k.shape[3]), dtype=acc, device=k.device)
                comm.send_recv(grad_prev, grad_in if block.size else None)
            comm.commit()
            grad = None
            if block.size:
                grad = torch.zeros((2, *k.shape[:2], block.size, k.shape[3]), dtype=acc, device=k.device)
                pieces, calls = ctx.steps[step]
                if pieces:
                    backward_(dout, q, held[0], held[1], out, lse, pieces, calls, p.scale, dq, grad[0], grad[1])
            comm.wait()
            if grad is not None and grad_in is not None:
                grad += grad_in
            grad_prev, held = grad, incoming
        # The last block's accumulator is complete one hop later, at its owner.
        own = torch.empty((2, *k.shape[:2], mine.size, k.shape[3]), dtype=acc, device=k.device)
        comm.send_recv(grad_prev, own if mine.size else None)
        comm.commit()
        comm.wait()
        dk = mine.put(own[0].to(k.dtype), k) if mine.size else torch.zeros_like(k)
        dv = mine.put(own[1].to(v.dtype), v) if mine.size else torch.zeros_like(v)
        return dq.to(q.dtype), dk, dv, None
