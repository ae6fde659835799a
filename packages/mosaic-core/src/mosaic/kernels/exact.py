"""The exact fallback: attention as plain matmuls in fp32 (fp64 for fp64), any device, dtype and head dim."""

from __future__ import annotations

import torch

from .contract import Kernel, lse_dtype

__all__ = ["MathKernel"]

# It materialises scores; bound them to ~1 GiB of fp32 per chunk.
_MAX_SCORES = 1 << 28


class MathKernel(Kernel):
    """Exact reference arithmetic in fp32 (fp64 for fp64): any device, dtype and head dim."""

    name = "math"
    device_type = ""

    def max_batch(self, heads, q_len, k_len):
        return max(1, _MAX_SCORES // max(1, heads * q_len * k_len))

    @staticmethod
    def _scores(q, k, causal, scale):
        acc = lse_dtype(q.dtype)
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        if causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores

    def forward(self, q, k, v, causal, scale):
        scores = self._scores(q, k, causal, scale)
        # Normalise by the sum itself, as the fused kernels do: exp(scores - lse) would carry the
        # rounding of lse (an ulp of the largest score) into every output row.
        top = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # a row with no key: weights 0, lse -inf
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        out = torch.matmul(weights, v.to(weights.dtype)) / total.clamp_min(torch.finfo(total.dtype).tiny)
        return out.to(q.dtype), (top + total.log()).squeeze(-1), None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        acc = lse.dtype
        probs = torch.exp(self._scores(q, k, causal, scale) - lse.unsqueeze(-1))
        dout_ = dout.to(acc)
        dv = torch.matmul(probs.transpose(-1, -2), dout_)
        dp = torch.matmul(dout_, v.to(acc).transpose(-1, -2))
        delta = (dout_ * out.to(acc)).sum(-1, keepdim=True)
        ds = probs * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
