"""MagiAttention's flexible flash attention (FFA) as a block kernel of Mosaic: ``local``'s ``kernel="ffa"``.

Mosaic's kernels take ``(batch', heads, rows, head_dim)`` and answer ``(out,
lse)``; FFA takes one packed sequence ``(tokens, heads, head_dim)`` and a pair
of q/k token ranges per attention block. Batch' entry ``i`` becomes the range
pair ``[i L, (i+1) L) -> [i S, (i+1) S)``: FULL, or CAUSAL for the square
diagonal blocks Mosaic asks causal (where every alignment rule agrees), so a key
prefix (``kv_len``) is FFA's native case. Packing is one copy per tensor that
also zero-pads the head dim to FFA's 64 or 128 (the softmax scale stays the
caller's); where q is already ``(batch', rows, heads, 64 or 128)`` in memory it
is a view. The forward accumulates ``out`` in fp32 and the backward ``dq, dk,
dv`` in fp32, FFA's atomic kernels: the variant MagiAttention's own autograd
runs, so the JIT cache of docs/magi.md covers every call. Given a merged
``(out, lse)`` the backward is each block's exact share, as for every Mosaic
kernel.

Not picked automatically (``automatic = False``): on one H200 it is 4.7 % faster
than cuDNN on nanoTabPFN's key-prefix row shape and 1 % at head dim 128, slower
on full attention at head dim 24, and its padded packed copies and fp32
accumulators take 3-5x cuDNN's working memory (docs/magi.md, "FFA as local's
kernel").
"""

from __future__ import annotations

import types
from functools import cache

import torch
import torch.nn.functional as F

from mosaic.sdk import BlockSpec, Kernel

from .magi import _MAX_TOKENS, INSTALL_HINT, gpu_reasons, is_installed
from .mask import FFA_HEAD_DIMS, padded_head_dim

__all__ = ["FfaKernel"]

# MagiAttention's attn_type_map codes.
_FULL, _CAUSAL = 0, 1


@cache
def _ffa() -> types.ModuleType:
    """``magi_attention.functional.flex_flash_attn``, imported on first use.

    Its ``_flex_flash_attn_forward``/``_backward`` are the functions its own autograd
    calls; Mosaic needs them because its backward runs against a merged ``(out, lse)``.
    """
    import magi_attention.functional.flex_flash_attn as ffa

    return ffa


def _pack(t: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, H, L, d)`` as FFA's ``(B L, H, width)``, zero-padded: a view where the memory order allows."""
    b, h, n, d = t.shape
    rows = t.transpose(1, 2)
    if d == width and rows.is_contiguous():
        return rows.view(b * n, h, d)
    out = F.pad(rows, (0, width - d)) if d != width else rows.contiguous()
    return out.reshape(b * n, h, width)


def _unpack(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """FFA's ``(B L, H, width)`` back as ``like``'s ``(B, H, L, d)`` in its dtype (a strided view)."""
    b, h, n, d = like.shape
    return t[..., :d].to(like.dtype).view(b, n, h, d).transpose(1, 2)


def _ranges(b: int, n: int, s: int, causal: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    starts = torch.arange(b, dtype=torch.int32, device=device)
    q_ranges = torch.stack([starts * n, starts * n + n], 1)
    k_ranges = torch.stack([starts * s, starts * s + s], 1)
    types_ = torch.full((b,), _CAUSAL if causal else _FULL, dtype=torch.int32, device=device)
    return q_ranges, k_ranges, types_


class FfaKernel(Kernel):
    """FFA on one GPU: every batch' entry a q/k range pair of one packed sequence."""

    name = "ffa"
    strided_inputs = True  # it packs (and pads) itself: a contiguous copy first would be a second copy
    automatic = False
    dtypes = frozenset({torch.float16, torch.bfloat16})
    max_head_dim = FFA_HEAD_DIMS[-1]

    def unavailable(self, device: torch.device) -> list[str]:
        out = super().unavailable(device)
        if not is_installed():
            return [*out, INSTALL_HINT]
        return out or gpu_reasons(device, _ffa)

    def extra_reasons(self, spec: BlockSpec) -> list[str]:
        if spec.batch * spec.q_len > _MAX_TOKENS:
            return [f"batch' x rows = {spec.batch * spec.q_len} tokens; FFA's ranges are int32"]
        return []

    def max_batch(self, heads: int, q_len: int, k_len: int) -> int:
        # Batch' entries are ranges of one sequence, not grid dims; the int32 bound is a reason above.
        return 1 << 62

    def forward(self, q, k, v, causal, scale):
        width = padded_head_dim(q.shape[-1])
        b, _, n, _ = q.shape
        ranges = _ranges(b, n, k.shape[2], causal, q.device)
        out, meta = _ffa()._flex_flash_attn_forward(
            q=_pack(q, width),
            k=_pack(k, width),
            v=_pack(v, width),
            sink=None,
            sink_layout="sh",
            out=None,
            lse=None,
            q_ranges=ranges[0],
            k_ranges=ranges[1],
            attn_type_map=ranges[2],
            softmax_scale=scale,
            softcap=0.0,
            out_type=torch.float32,
            disable_fwd_atomic_reduction=False,
            deterministic=False,
            sm_margin=0,
        )
        lse = meta.lse.view(b, n, -1).transpose(1, 2)
        return _unpack(out, q), lse, ranges

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        width = padded_head_dim(q.shape[-1])
        q_ranges, k_ranges, types_ = aux
        dq, dk, dv, _ = _ffa()._flex_flash_attn_backward(
            dout=_pack(dout, width),
            q=_pack(q, width),
            k=_pack(k, width),
            v=_pack(v, width),
            sink=None,
            sink_layout="sh",
            out=_pack(out, width),
            lse=lse.transpose(1, 2).reshape(-1, lse.shape[1]).contiguous(),
            dq=None,
            dk=None,
            dv=None,
            dsink=None,
            q_ranges=q_ranges,
            k_ranges=k_ranges,
            attn_type_map=types_,
            softmax_scale=scale,
            softcap=0.0,
            dq_type=torch.float32,
            dk_type=torch.float32,
            dv_type=torch.float32,
            disable_bwd_dkv_atomic_reduction=False,
            deterministic=False,
            sm_margin=0,
        )
        return _unpack(dq, q), _unpack(dk, k), _unpack(dv, v)
