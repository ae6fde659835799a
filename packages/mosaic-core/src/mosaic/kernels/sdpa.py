"""PyTorch's fused SDPA operators as block kernels: cuDNN and flash on CUDA, the flash operator on CPU.

They return the log-sum-exp and have backward operators that take a given
``out`` and ``lse``, which is all the contract needs. PyTorch's
memory-efficient operator is not used: on torch 2.11 its backward gave wrong
dQ when handed a merged ``out``/``lse`` (seen on an H200, 2026-11-27).

cuDNN reads q, k, v through their strides and writes ``out`` in q's memory
order, so the projections' views go in without copies and ``out`` comes back
in the order the output projection reads; its backward wants ``dout`` in
``out``'s order, which is the order the output projection's gradient has.
"""

from __future__ import annotations

import torch

from .contract import Kernel, cuda_capability

__all__ = ["CpuFlashKernel", "CudnnKernel", "FlashKernel"]

aten = torch.ops.aten


def _cuda_reasons(device: torch.device, flag: str, min_capability: tuple[int, int]) -> list[str]:
    out = []
    if not getattr(torch.backends.cuda, flag)():
        out.append(f"disabled by torch.backends.cuda.{flag.replace('_enabled', '')}")
    capability = cuda_capability(device)
    if capability is not None and capability < min_capability:
        out.append(f"needs compute capability >= {min_capability}, the GPU has {capability}")
    return out


class CudnnKernel(Kernel):
    """PyTorch's cuDNN attention (sm90+): reads q, k, v through their strides, writes ``out`` in q's order."""

    name = "cudnn"
    strided_inputs = True  # any strides with 16-byte aligned rows (_aligned); out follows q's memory order
    dtypes = frozenset({torch.float16, torch.bfloat16})
    max_head_dim = 128
    pad_head_dim_to = 8

    def unavailable(self, device):
        out = super().unavailable(device)
        if not out:
            out += _cuda_reasons(device, "cudnn_sdp_enabled", (9, 0))
            if not torch.backends.cudnn.is_available():
                out.append("cuDNN is not available")
        return out

    def forward(self, q, k, v, causal, scale):
        q, k, v = (_aligned(t) for t in (q, k, v))
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return out, lse.reshape(q.shape[:3]), (lse.shape, out.stride(), cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        lse_shape, out_stride, cum_q, cum_k, max_q, max_k, seed, offset = aux
        # The backward sees out and dout laid out exactly as this block's forward wrote out (as in torch's own
        # autograd): a merged out of a blockwise strategy may sit in another memory order than q's.
        out = _laid_out(out, out_stride)
        dout = _laid_out(dout, out_stride)
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout,
            _aligned(q),
            _aligned(k),
            _aligned(v),
            out,
            lse.reshape(lse_shape).contiguous(),
            seed,
            offset,
            None,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            causal,
            scale=scale,
        )[:3]


def _laid_out(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` with exactly ``stride`` (a dense layout of its shape): itself when it has it (and cuDNN can read
    it where it starts), else a copy."""
    if t.stride() == stride and _aligned(t) is t:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when cuDNN can read it through its strides (unit last stride, 16-byte aligned rows), else a copy."""
    step = max(1, 16 // t.element_size())
    strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1]
    if t.stride(-1) == 1 and t.storage_offset() % step == 0 and all(s % step == 0 for s in strides):
        return t
    return t.contiguous()


class FlashKernel(Kernel):
    """PyTorch's flash attention operator (sm80+, head dims up to 256)."""

    name = "flash"
    dtypes = frozenset({torch.float16, torch.bfloat16})
    max_head_dim = 256
    pad_head_dim_to = 8

    def unavailable(self, device):
        return super().unavailable(device) or _cuda_reasons(device, "flash_sdp_enabled", (8, 0))

    def forward(self, q, k, v, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return aten._scaled_dot_product_flash_attention_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out.contiguous(),
            lse.contiguous(),
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            causal,
            seed,
            offset,
            scale=scale,
        )


class CpuFlashKernel(Kernel):
    """PyTorch's flash attention operator for CPU tensors, every float dtype."""

    name = "cpu_flash"
    device_type = "cpu"
    dtypes = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})

    def forward(self, q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, lse.dtype

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.to(aux).contiguous(), 0.0, causal, scale=scale
        )
