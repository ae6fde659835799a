"""The ``local`` backend: the attention dim is whole on this rank; no communication."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend, Capabilities
from .blockwise import cut_spans, span_attention
from .kernels import CUDA_MAX_BATCH_HEADS
from .problem import AttentionProblem


class LocalBackend(Backend):
    """Attention over an unsharded dim with the fused kernels (and dropout, which only it supports)."""

    name = "local"
    capabilities = Capabilities(distributed=False, dropout=True)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        p = problem
        if p.dropout > 0:
            return _dropout_attention(q, k, v, p)
        return span_attention(q, k, v, p.q_spans, p.kv_spans(), causal=p.causal, kv_len=p.kv_len, scale=p.scale)


def _dropout_attention(q, k, v, p: AttentionProblem) -> torch.Tensor:
    """Dropout on attention weights needs the random mask in backward: leave it to torch's SDPA."""
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
