"""The ``local`` backend: the attention dim is whole on this rank; no communication."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import Backend, Capabilities, Plan
from .blockwise import Piece, SpanAttention, blocks, cut_spans
from .cost import Cost, Pass, attention_passes
from .kernels import CUDA_MAX_BATCH_HEADS, get_kernel
from .options import Options
from .problem import AttentionProblem

__all__ = ["LocalBackend", "LocalOptions", "SpanPlan", "span_plan"]


@dataclass(frozen=True)
class LocalOptions(Options):
    """Options of ``local``.

    Args:
        kernel: the block kernel every call uses, by name (:func:`mosaic.kernels.kernel_names`:
            ``"cudnn"``, ``"flash"``, ``"tiny"``, ``"math"``, ... and those of installed packages,
            e.g. mosaic-magi's ``"ffa"``). ``None`` (default): the fastest that accepts each input.
            A named kernel that can't run an input raises, saying why.
    """

    kernel: str | None = None

    def __post_init__(self) -> None:
        if self.kernel is not None:
            if not isinstance(self.kernel, str):
                raise ValueError(f"option kernel must be a kernel's name or None, got {self.kernel!r}")
            get_kernel(self.kernel)  # an unknown name lists the known ones


class LocalBackend(Backend):
    """Attention over an unsharded dim with the fused kernels (and dropout, which only it supports)."""

    name = "local"
    capabilities = Capabilities(distributed=False, dropout=True)
    Options = LocalOptions

    def plan(self, problem: AttentionProblem) -> Plan:
        kernel = getattr(problem.options, "kernel", None)
        if problem.dropout > 0:
            if kernel is not None:
                raise ValueError(
                    f"backend 'local' with kernel={kernel!r} can't apply attention dropout ({problem.dropout}): "
                    "dropout runs torch's SDPA, which needs the random mask in its backward; drop the kernel "
                    "option or set dropout=0 (model.eval() turns it off)"
                )
            return DropoutPlan(problem, _local_cost(problem))
        return span_plan(problem, kernel)


@dataclass(frozen=True)
class SpanPlan(Plan):
    """Every key is local: one plan of blocks (:func:`mosaic.blockwise.blocks`) over this rank's rows."""

    pieces: tuple[Piece, ...]  # each with the kernel the plan chose for it

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return SpanAttention.apply(q, k, v, list(self.pieces), self.problem.scale)


def span_plan(problem: AttentionProblem, kernel: str | None = None) -> SpanPlan:
    """The local plan of ``problem`` (also a distributed strategy's plan on a group of one), on ``kernel``."""
    p = problem
    pieces = blocks(p.q_spans, p.kv_spans(), causal=p.causal, kv_len=p.kv_len, spec=p.block_spec(), kernel=kernel)
    return SpanPlan(p, _local_cost(p), tuple(pieces))


def _local_cost(p: AttentionProblem) -> Cost:
    forward, backward = attention_passes(p.batch, p.heads, p.head_dim, p.busiest_pairs())
    return Cost(Pass(flops=forward), Pass(flops=backward))


@dataclass(frozen=True)
class DropoutPlan(Plan):
    """Dropout on attention weights needs the random mask in backward: leave it to torch's SDPA."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.problem
        keys = cut_spans(p.kv_spans(), p.kv_len)[0][1]
        k, v = k[:, :, :keys], v[:, :, :keys]
        if p.kv_heads != p.heads:
            k, v = (t.repeat_interleave(p.heads // p.kv_heads, dim=1) for t in (k, v))
        mask = None
        if p.causal:
            mask = torch.ones(q.shape[2], keys, dtype=torch.bool, device=q.device).tril()
        step = max(1, CUDA_MAX_BATCH_HEADS // p.heads)
        outs = [
            F.scaled_dot_product_attention(q[s], k[s], v[s], attn_mask=mask, dropout_p=p.dropout, scale=p.scale)
            for s in (slice(i, i + step) for i in range(0, q.shape[0], step))
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
