"""``allgather``: gather K/V once, attend the local queries to all keys.

Only key rows below ``kv_len`` are gathered (a rank holding none sends
nothing), so the TabPFN train/test split moves and computes only the train
rows. The backward reduce-scatters dK/dV, summed in fp32, to their owners.

Backend option ``chunks`` (default 1) cuts the work into chunks of
(batch x kv head) groups, which attention treats independently, so
communication can overlap the kernels: the forward gathers chunk ``c + 1``
while it attends to chunk ``c``, the backward reduce-scatters chunk ``c``
while it computes chunk ``c + 1``. On one NVLink host it does not pay: NCCL's
kernels take SMs from the attention kernels for as long as they run: 2
chunks measured within 1 % of 1, 8 chunks 3-9 % slower (2 x H200,
docs/benchmarks.md). It is there for slower links.

Per rank: communication ``(P-1)/P * N' * 2 * Hkv * d`` elements each way
(``N'`` = keys kept), memory ``O(N' * Hkv * d)`` for the gathered K/V.
"""

from __future__ import annotations

import itertools

import torch

from mosaic import blockwise
from mosaic.backend import Backend, Capabilities
from mosaic.comm import start_all_gather, start_reduce_scatter
from mosaic.kernels import lse_dtype
from mosaic.problem import AttentionProblem, KeyBlock


class AllGatherBackend(Backend):
    """KV all-gather ("llama3-style") sequence parallelism."""

    name = "allgather"
    capabilities = Capabilities()

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        chunks = problem.options.get("chunks")
        if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
            return [f"backend option chunks={chunks!r} must be a positive int"]
        return []

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        p = problem
        if p.size == 1:
            return blockwise.span_attention(
                q, k, v, p.q_spans, p.kv_spans(), causal=p.causal, kv_len=p.kv_len, scale=p.scale
            )
        return AllGatherAttention.apply(q, k, v, p)


def chunk_groups(p: AttentionProblem) -> list[slice]:
    """Slices of the ``batch * kv_heads`` groups, one per chunk (backend option ``chunks``, default 1)."""
    groups = p.batch * p.kv_heads
    chunks = max(1, min(p.options.get("chunks", 1), groups))
    bounds = [groups * i // chunks for i in range(chunks + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _by_group(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, L, d)`` viewed as ``(B * Hkv, H / Hkv, L, d)``: one batch entry per kv head."""
    b, h, length, d = t.shape
    return t.reshape(b * kv_heads, h // kv_heads, length, d)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: AttentionProblem):
        blocks = [p.kv_block(r) for r in range(p.size)]
        sizes, mine = [b.size for b in blocks], blocks[p.rank]
        pieces = blockwise.plan(p.q_spans, tuple(s for b in blocks for s in b.spans), causal=p.causal)
        qg = _by_group(q.contiguous(), p.kv_heads)
        kg, vg = _by_group(mine.take(k), p.kv_heads), _by_group(mine.take(v), p.kv_heads)
        chunks = chunk_groups(p)

        def gather(c: slice):
            # K and V travel as one tensor: one collective per chunk.
            return start_all_gather(torch.stack([kg[c], vg[c]]), sizes, 3, p.group)

        out = torch.empty_like(qg)
        lse = torch.empty(qg.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
        pending, gathered, calls = gather(chunks[0]), [], []
        for i, c in enumerate(chunks):
            kv = pending.wait()
            if i + 1 < len(chunks):
                pending = gather(chunks[i + 1])
            o, lse[c], call = blockwise.forward(qg[c], kv[0], kv[1], pieces, p.scale)
            out[c] = o
            gathered.append(kv)
            calls.append(call)
        ctx.save_for_backward(qg, out, lse, *gathered)
        ctx.problem, ctx.pieces, ctx.calls, ctx.chunks, ctx.sizes = p, pieces, calls, chunks, sizes
        ctx.q_shape, ctx.kv_like = q.shape, (k.shape, k.dtype, v.shape, v.dtype)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        qg, out, lse, *gathered = ctx.saved_tensors
        p: AttentionProblem = ctx.problem
        k_shape, k_dtype, v_shape, v_dtype = ctx.kv_like
        dout = _by_group(dout.contiguous(), p.kv_heads)
        acc = lse_dtype(qg.dtype)
        dq = torch.empty_like(qg)
        scattered = []
        for c, kv, calls in zip(ctx.chunks, gathered, ctx.calls, strict=True):
            dq[c], dk, dv = blockwise.backward(
                dout[c], qg[c], kv[0], kv[1], out[c], lse[c], ctx.pieces, calls, p.scale, round_kv=False
            )
            # Summed in fp32 while the next chunk computes.
            scattered.append((start_reduce_scatter(dk, ctx.sizes, 2, p.group, acc),
                              start_reduce_scatter(dv, ctx.sizes, 2, p.group, acc)))  # fmt: skip
        mine = p.kv_block(p.rank)
        dk = torch.cat([s.wait() for s, _ in scattered]).view(*k_shape[:2], mine.size, k_shape[3])
        dv = torch.cat([s.wait() for _, s in scattered]).view(*v_shape[:2], mine.size, v_shape[3])
        like_k, like_v = dq.new_empty(k_shape, dtype=k_dtype), dq.new_empty(v_shape, dtype=v_dtype)
        return dq.view(ctx.q_shape), _place(mine, dk, like_k), _place(mine, dv, like_v), None


def _place(mine: KeyBlock, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's key gradient at its rows of a tensor shaped like its K (zeros past ``kv_len``)."""
    return mine.put(grad.to(like.dtype), like) if mine.size else torch.zeros_like(like)
