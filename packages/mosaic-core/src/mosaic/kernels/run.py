"""Running a kernel on one block: head-dim padding, grouped K/V heads, batch chunks.

:func:`attention_forward` and :func:`attention_backward` are the pair every
strategy is built from. They bring the block to what the kernel declares
(head dim padded to ``pad_head_dim_to``, K/V heads repeated to the query
heads unless the kernel takes fewer, the batch cut where a grid limit
applies) and back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .contract import BlockSpec, Kernel, KernelCall, default_scale, lse_dtype, round_up
from .registry import choose_kernel, get_kernel

__all__ = ["attention_backward", "attention_forward"]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped K/V heads to match the query heads (GQA/MQA)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _reduce_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated K/V heads back onto their group.

    The sum stays in fp32 (fp64 for fp64): callers accumulate it further, and a
    rounding here would be one more per block and group.
    """
    b, h, s, d = grad.shape
    if h == kv_heads:
        return grad
    return grad.view(b, kv_heads, h // kv_heads, s, d).sum(2, dtype=lse_dtype(grad.dtype))


def _chunks(batch: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kernel: str | Kernel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, KernelCall | None]:
    """Attention of ``q`` over ``k, v``: ``(out, lse, call)``.

    Args:
        q: ``(B, H, L, d)``.
        k: ``(B, Hkv, S, d)`` with ``H % Hkv == 0``.
        v: values, shaped like ``k``.
        causal: top-left causal mask (query row ``i`` sees key rows ``<= i``).
        scale: softmax scale, default ``1/sqrt(d)``.
        kernel: the kernel to use: a name (checked: one that can't run the block raises, saying
            why), or the :class:`~mosaic.kernels.Kernel` a plan chose (run as it is); default the
            fastest that accepts the block (:func:`~mosaic.kernels.choose_kernel`).

    Returns:
        ``out`` ``(B, H, L, d)`` in q's dtype, ``lse`` ``(B, H, L)`` in :func:`lse_dtype`
        (``-inf`` where a row has no key), and the call record :func:`attention_backward` needs.
    """
    b, h, length, d = q.shape
    scale = default_scale(d) if scale is None else scale
    if length == 0 or k.shape[2] == 0:
        out = q.new_zeros(q.shape)
        return out, torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device), None
    if isinstance(kernel, Kernel):
        chosen = kernel
    else:
        chosen = choose_kernel(BlockSpec.of(q, k, causal), kernel)
    width = round_up(d, chosen.pad_head_dim_to)
    if not chosen.native_gqa:
        k, v = _expand_heads(k, h), _expand_heads(v, h)
    qp, kp, vp = (_pad_last(t, width) for t in (q, k, v))
    step = chosen.max_batch(h, length, k.shape[2])
    if step >= b:
        out, lse, aux = chosen.forward(qp, kp, vp, causal, scale)
        auxes: tuple[Any, ...] = (aux,)
    else:
        out = qp.new_empty(qp.shape)
        lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
        aux_list = []
        for s in _chunks(b, step):
            out[s], lse[s], aux = chosen.forward(qp[s], kp[s], vp[s], causal, scale)
            aux_list.append(aux)
        auxes = tuple(aux_list)
    return out[..., :d], lse.to(lse_dtype(q.dtype)), KernelCall(chosen.name, auxes)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: KernelCall | None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the final ``out`` and ``lse`` of its query rows.

    ``out`` and ``lse`` may merge this block with others: the result is then this
    block's share of dq and its exact dk, dv. With grouped K/V heads repeated for the
    kernel, dk and dv come back in fp32 (:func:`lse_dtype`), summed over each group
    unrounded; a kernel that takes grouped heads itself sums them in its own fp32
    accumulators and returns them in k's dtype.
    """
    b, h, length, d = q.shape
    if call is None:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    scale = default_scale(d) if scale is None else scale
    kernel = get_kernel(call.kernel)
    width = round_up(d, kernel.pad_head_dim_to)
    kv_heads = k.shape[1]
    if not kernel.native_gqa:
        k, v = _expand_heads(k, h), _expand_heads(v, h)
    qp, kp, vp, op, dop = (_pad_last(t, width) for t in (q, k, v, out.to(q.dtype), dout.to(q.dtype)))
    if len(call.aux) == 1:
        dq, dk, dv = kernel.backward(dop, qp, kp, vp, op, lse, call.aux[0], causal, scale)
    else:
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        step = kernel.max_batch(h, length, k.shape[2])
        for s, aux in zip(_chunks(b, step), call.aux, strict=True):
            dq[s], dk[s], dv[s] = kernel.backward(dop[s], qp[s], kp[s], vp[s], op[s], lse[s], aux, causal, scale)
    return dq[..., :d], _reduce_heads(dk[..., :d], kv_heads), _reduce_heads(dv[..., :d], kv_heads)
