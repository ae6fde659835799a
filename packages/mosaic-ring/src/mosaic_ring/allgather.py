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
from dataclasses import dataclass
from typing import ClassVar

import torch

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    Capabilities,
    Cost,
    KeyBlock,
    Options,
    Pass,
    Plan,
    attention_passes,
    blockwise,
    check_positive_int,
    lse_dtype,
    span_plan,
    start_all_gather,
    start_reduce_scatter,
)

__all__ = ["AllGatherBackend", "AllGatherOptions", "AllGatherPlan"]


@dataclass(frozen=True)
class AllGatherOptions(Options):
    """Options of ``allgather``.

    Args:
        chunks: cut the work into this many chunks of (batch x kv head) groups, so the
            gather of chunk ``c + 1`` overlaps the kernels of chunk ``c`` (and the
            reduce-scatter likewise in the backward). 1 on one NVLink host (measured).
    """

    chunks: int = 1

    def __post_init__(self) -> None:
        check_positive_int("chunks", self.chunks)


class AllGatherBackend(Backend):
    """KV all-gather ("llama3-style") sequence parallelism."""

    name = "allgather"
    capabilities = Capabilities()
    Options = AllGatherOptions

    def plan(self, problem: AttentionProblem) -> Plan:
        p = problem
        if p.size == 1:
            return span_plan(p)
        blocks = [p.kv_block(r) for r in range(p.size)]
        sizes = tuple(b.size for b in blocks)
        pieces = blockwise.blocks(
            p.q_spans, tuple(s for b in blocks for s in b.spans), causal=p.causal, spec=p.block_spec()
        )
        groups = p.batch * p.kv_heads
        chunks = max(1, min(p.options.chunks, groups))
        bounds = [groups * i // chunks for i in range(chunks + 1)]
        slices = tuple(slice(a, b) for a, b in itertools.pairwise(bounds))
        return AllGatherPlan(p, _cost(p, sizes, chunks), sizes, blocks[p.rank], tuple(pieces), slices)


def _cost(p: AttentionProblem, sizes: tuple[int, ...], chunks: int) -> Cost:
    """The busiest rank: every other rank's kept keys arrive in the forward; in the backward the fp32 dK/dV of
    its own come back from the P - 1 others (a reduce-scatter). Chunks hide all but the first transfer."""
    e = torch.empty((), dtype=p.dtype).element_size()
    f = torch.empty((), dtype=lse_dtype(p.dtype)).element_size()
    width = p.batch * 2 * p.kv_heads * p.head_dim
    forward, backward = attention_passes(p.batch, p.heads, p.head_dim, p.busiest_pairs())
    hidden = (chunks - 1) / chunks
    return Cost(
        Pass(forward, width * max(sum(sizes) - own for own in sizes) * e, hidden, chunks),
        Pass(backward, width * max(sizes) * (p.size - 1) * f, hidden, 2 * chunks),
        memory=width * sum(sizes) * (e + f),
    )


@dataclass(frozen=True)
class AllGatherPlan(Plan):
    """What one rank gathers and computes: every rank's kept key rows, and the pieces over them."""

    traceable: ClassVar[bool] = True  # its collectives trace into a compiled graph

    sizes: tuple[int, ...]  # kept key rows of every rank
    mine: KeyBlock
    pieces: tuple[blockwise.Piece, ...]
    chunks: tuple[slice, ...]  # of the batch x kv-head groups

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return AllGatherAttention.apply(q, k, v, self)


def _by_group(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, L, d)`` viewed as ``(B * Hkv, H / Hkv, L, d)``: one batch entry per kv head."""
    b, h, length, d = t.shape
    return t.reshape(b * kv_heads, h // kv_heads, length, d)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: AllGatherPlan):
        p = plan.problem
        sizes, mine, pieces = list(plan.sizes), plan.mine, list(plan.pieces)
        qg = _by_group(q.contiguous(), p.kv_heads)
        kg, vg = _by_group(mine.take(k), p.kv_heads), _by_group(mine.take(v), p.kv_heads)
        chunks = plan.chunks

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
        ctx.plan, ctx.calls = plan, calls
        ctx.q_shape, ctx.kv_like = q.shape, (k.shape, k.dtype, v.shape, v.dtype)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        qg, out, lse, *gathered = ctx.saved_tensors
        plan: AllGatherPlan = ctx.plan
        p = plan.problem
        k_shape, k_dtype, v_shape, v_dtype = ctx.kv_like
        dout = _by_group(dout.contiguous(), p.kv_heads)
        acc = lse_dtype(qg.dtype)
        dq = torch.empty_like(qg)
        scattered, sizes = [], list(plan.sizes)
        for c, kv, calls in zip(plan.chunks, gathered, ctx.calls, strict=True):
            dq[c], dk, dv = blockwise.backward(
                dout[c], qg[c], kv[0], kv[1], out[c], lse[c], list(plan.pieces), calls, p.scale, round_kv=False
            )
            # Summed in fp32 while the next chunk computes.
            scattered.append((start_reduce_scatter(dk, sizes, 2, p.group, acc),
                              start_reduce_scatter(dv, sizes, 2, p.group, acc)))  # fmt: skip
        mine = plan.mine
        dk = torch.cat([s.wait() for s, _ in scattered]).view(*k_shape[:2], mine.size, k_shape[3])
        dv = torch.cat([s.wait() for _, s in scattered]).view(*v_shape[:2], mine.size, v_shape[3])
        like_k, like_v = dq.new_empty(k_shape, dtype=k_dtype), dq.new_empty(v_shape, dtype=v_dtype)
        return dq.view(ctx.q_shape), _place(mine, dk, like_k), _place(mine, dv, like_v), None


def _place(mine: KeyBlock, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's key gradient at its rows of a tensor shaped like its K (zeros past ``kv_len``)."""
    return mine.put(grad.to(like.dtype), like) if mine.size else torch.zeros_like(like)
