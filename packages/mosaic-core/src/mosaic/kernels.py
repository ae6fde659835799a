"""Block attention kernels: ``(out, lse)`` forward and the matching backward.

Every strategy is built from one pair of functions, :func:`attention_forward`
and :func:`attention_backward`, on the canonical layout ``(batch, heads, seq,
head_dim)``. The forward returns the log-sum-exp of each query row (fp32; fp64
for fp64 inputs) so partial results over different keys can be merged; the
backward takes the *final* merged ``out`` and ``lse``, which makes the gradient
of every key block exact without recomputing or storing a score matrix.

The work is done by PyTorch's fused SDPA operators, picked in order of speed
among those that accept the input (cuDNN, then flash on CUDA; the CPU flash
operator on CPU) with an exact math fallback (fp32/fp64 on CUDA); query and
key lengths <= 64 (feature attention) go to a Triton kernel first
(:mod:`mosaic.tiny`). Packages add kernels through the entry points
``mosaic.kernels`` (mosaic-magi's ``ffa``); a kernel with ``automatic =
False`` runs only where it is named (``local``'s ``kernel`` option). PyTorch's
memory-efficient operator is not used: on torch 2.11 its backward gave wrong
dQ when handed a merged ``out``/``lse`` (seen on an H200, 2026-11-27). ``causal`` means
top-left aligned, and callers only ask for it on square blocks whose query and
key rows sit at the same positions, so no kernel's alignment rule matters.
``MOSAIC_KERNEL=<name>`` forces one kernel (benchmarks, debugging).

cuDNN reads q, k, v through their strides and writes ``out`` in q's memory
order, so the projections' views go in without copies and ``out`` comes back
in the order the output projection reads; its backward wants ``dout`` in
``out``'s order, which is the order the output projection's gradient has.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.nn.functional as F

from . import tiny

aten = torch.ops.aten

__all__ = [
    "CUDA_MAX_BATCH_HEADS",
    "ENTRY_POINT_GROUP",
    "KERNELS",
    "CpuFlashKernel",
    "CudnnKernel",
    "FlashKernel",
    "Kernel",
    "KernelCall",
    "MathKernel",
    "TinyKernel",
    "attention_backward",
    "attention_forward",
    "default_scale",
    "get_kernel",
    "kernel_names",
    "kernel_reasons",
    "lse_dtype",
    "select_kernel",
]

# Fused CUDA kernels put batch and heads on grid dimensions limited to 65535.
CUDA_MAX_BATCH_HEADS = 65535
# The math fallback materialises scores; bound them to ~1 GiB of fp32 per chunk.
_MATH_MAX_SCORES = 1 << 28
# Packages that bring kernels name them under this entry point group (value: a Kernel subclass).
ENTRY_POINT_GROUP = "mosaic.kernels"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-sum-exp and of partial-result accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class KernelCall:
    """What a backward needs from its forward besides tensors: the kernel and its per-chunk state."""

    kernel: str
    aux: tuple[Any, ...]


class Kernel(ABC):
    """One fused operator. Inputs arrive with equal heads and the padded head dim, in the strides the caller
    had (``SpanAttention`` copies them contiguous first unless ``strided_inputs``)."""

    name: str = ""
    device_type: str = "cuda"
    # Reads q, k, v through their strides (no contiguous copy needed, nor worth making).
    strided_inputs: bool = False
    # May be picked for an input nobody named a kernel for (in KERNELS' order); False: only when named.
    automatic: bool = True
    dtypes: frozenset[torch.dtype] = frozenset()
    max_head_dim: int | None = None
    pad_head_dim_to: int = 1

    def reasons(self, q: torch.Tensor, k: torch.Tensor | None = None) -> list[str]:
        """Why this kernel can't run ``q`` (against ``k``, for kernels that care); empty when it can."""
        out = []
        if q.device.type != self.device_type:
            out.append(f"needs a {self.device_type} tensor, got {q.device.type}")
        if self.dtypes and q.dtype not in self.dtypes:
            out.append(f"dtype {q.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        d = _round_up(q.shape[-1], self.pad_head_dim_to)
        if self.max_head_dim is not None and d > self.max_head_dim:
            out.append(f"head dim {q.shape[-1]} > {self.max_head_dim}")
        out.extend(self._extra_reasons(q))
        return out

    def _extra_reasons(self, q: torch.Tensor) -> list[str]:
        return []

    def max_batch(self, heads: int, q_len: int, k_len: int) -> int:
        if self.device_type == "cuda":
            return max(1, CUDA_MAX_BATCH_HEADS // heads)
        return 1 << 62

    @abstractmethod
    def forward(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(out, lse (B, H, L), aux)`` for one batch chunk."""

    @abstractmethod
    def backward(self, dout, q, k, v, out, lse, aux, causal: bool, scale: float):
        """``(dq, dk, dv)`` for one batch chunk, given the final ``out`` and ``lse``."""


def _cuda_reasons(flag: str, min_capability: tuple[int, int]) -> list[str]:
    out = []
    if not getattr(torch.backends.cuda, flag)():
        out.append(f"disabled by torch.backends.cuda.{flag.replace('_enabled', '')}")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < min_capability:
        out.append(f"needs compute capability >= {min_capability}")
    return out


class CudnnKernel(Kernel):
    name = "cudnn"
    strided_inputs = True  # any strides with 16-byte aligned rows (_aligned); out follows q's memory order
    dtypes = frozenset({torch.float16, torch.bfloat16})
    max_head_dim = 128
    pad_head_dim_to = 8

    def _extra_reasons(self, q):
        out = _cuda_reasons("cudnn_sdp_enabled", (9, 0))
        if not torch.backends.cudnn.is_available():
            out.append("cuDNN is not available")
        return out

    def forward(self, q, k, v, causal, scale):
        q, k, v = (_aligned(t) for t in (q, k, v))
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return out, lse.reshape(q.shape[:3]), (lse.shape, cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        lse_shape, cum_q, cum_k, max_q, max_k, seed, offset = aux
        out = _aligned(out)
        if dout.stride() != out.stride():  # cuDNN reads dout in out's memory order
            dout = torch.empty_like(out).copy_(dout)
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


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when cuDNN can read it through its strides (unit last stride, 16-byte aligned rows), else a copy."""
    step = max(1, 16 // t.element_size())
    strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1]
    if t.stride(-1) == 1 and t.storage_offset() % step == 0 and all(s % step == 0 for s in strides):
        return t
    return t.contiguous()


class FlashKernel(Kernel):
    name = "flash"
    dtypes = frozenset({torch.float16, torch.bfloat16})
    max_head_dim = 256
    pad_head_dim_to = 8

    def _extra_reasons(self, q):
        return _cuda_reasons("flash_sdp_enabled", (8, 0))

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


class TinyKernel(Kernel):
    """Query and key lengths <= 64 (feature attention): many (batch, head) pairs per tile, see :mod:`mosaic.tiny`."""

    name = "tiny"
    strided_inputs = True

    def reasons(self, q, k=None):
        return tiny.reasons(q, k)

    def max_batch(self, heads, q_len, k_len):
        return 1 << 62  # its grid is 1-D over tiles: no 65535 limit to chunk for

    def forward(self, q, k, v, causal, scale):
        out, lse = tiny.forward(q, k, v, causal=causal, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return tiny.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


class MathKernel(Kernel):
    """Exact reference arithmetic in fp32 (fp64 for fp64): any device, dtype and head dim."""

    name = "math"
    device_type = ""

    def reasons(self, q, k=None):
        return []

    def max_batch(self, heads, q_len, k_len):
        return max(1, _MATH_MAX_SCORES // max(1, heads * q_len * k_len))

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


# In order of preference: tiny first, as it accepts only the short sequences where it is the fastest;
# kernels of installed packages join before the math fallback when first asked for (_load_plugins).
KERNELS: dict[str, Kernel] = {
    k.name: k for k in (TinyKernel(), CudnnKernel(), FlashKernel(), CpuFlashKernel(), MathKernel())
}
_plugins_loaded = False


def _load_plugins() -> None:
    """Add the kernels of ``mosaic.kernels`` entry points (once); a broken one warns and is skipped."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    found: dict[str, Kernel] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in KERNELS or ep.name in found:
            continue
        try:
            kernel = ep.load()()
            if not isinstance(kernel, Kernel) or kernel.name != ep.name:
                raise TypeError(f"{ep.value} is not a mosaic.kernels.Kernel named {ep.name!r}")
        except Exception as exc:  # a broken plugin must not break the built-in kernels
            warnings.warn(f"kernel {ep.name!r} ({ep.value}) failed to load: {exc}", RuntimeWarning, stacklevel=3)
            continue
        found[ep.name] = kernel
    if found:
        math_kernel = KERNELS.pop("math")
        KERNELS.update(found)
        KERNELS["math"] = math_kernel


def kernel_names() -> list[str]:
    """Every kernel that can be named: the built-in ones and those of installed packages."""
    _load_plugins()
    return list(KERNELS)


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``; a ``ValueError`` listing the known ones otherwise."""
    _load_plugins()
    if name not in KERNELS:
        raise ValueError(f"kernel {name!r} is not one of {list(KERNELS)} (packages add kernels: mosaic-magi's 'ffa')")
    return KERNELS[name]


def kernel_reasons(q: torch.Tensor, k: torch.Tensor | None = None) -> dict[str, list[str]]:
    """For every kernel, why it can't run ``q`` against ``k`` (empty list: it can)."""
    _load_plugins()
    return {name: kernel.reasons(q, k) for name, kernel in KERNELS.items()}


def select_kernel(q: torch.Tensor, k: torch.Tensor | None = None, name: str | None = None) -> Kernel:
    """The kernel ``name`` (else the one ``MOSAIC_KERNEL`` names, else the first automatic one that accepts
    ``q`` against ``k``); a named kernel that can't run the input is an error saying why."""
    if name:
        return _named(name, q, k, f"kernel={name!r}")
    if forced := os.environ.get("MOSAIC_KERNEL"):
        return _named(forced, q, k, f"MOSAIC_KERNEL={forced}")
    for kernel in KERNELS.values():
        if kernel.automatic and not kernel.reasons(q, k):
            return kernel
    raise AssertionError("the math kernel accepts every input")


def _named(name: str, q: torch.Tensor, k: torch.Tensor | None, source: str) -> Kernel:
    try:
        kernel = get_kernel(name)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    reasons = kernel.reasons(q, k)
    if reasons:
        raise RuntimeError(f"{source} can't run this input: {'; '.join(reasons)}")
    return kernel


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, KernelCall | None]:
    """Attention of ``q`` over ``k, v``: ``(out, lse, call)``.

    Args:
        q: ``(B, H, L, d)``.
        k, v: ``(B, Hkv, S, d)`` with ``H % Hkv == 0``.
        causal: top-left causal mask (query row ``i`` sees key rows ``<= i``).
        scale: softmax scale, default ``1/sqrt(d)``.
        kernel: the kernel to use (:func:`select_kernel`); default the fastest that accepts the input.

    Returns:
        ``out`` ``(B, H, L, d)`` in q's dtype, ``lse`` ``(B, H, L)`` in :func:`lse_dtype`
        (``-inf`` where a row has no key), and the call record :func:`attention_backward` needs.
    """
    b, h, length, d = q.shape
    scale = default_scale(d) if scale is None else scale
    if length == 0 or k.shape[2] == 0:
        out = q.new_zeros(q.shape)
        return out, torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device), None
    chosen = select_kernel(q, k, kernel)
    width = _round_up(d, chosen.pad_head_dim_to)
    qp, kp, vp = (_pad_last(t, width) for t in (q, _expand_heads(k, h), _expand_heads(v, h)))
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
    block's share of dq and its exact dk, dv. With grouped K/V heads, dk and dv
    come back in fp32 (:func:`lse_dtype`), summed over each group unrounded.
    """
    b, h, length, d = q.shape
    if call is None:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    scale = default_scale(d) if scale is None else scale
    kernel = get_kernel(call.kernel)
    width = _round_up(d, kernel.pad_head_dim_to)
    qp, kp, vp, op, dop = (
        _pad_last(t, width) for t in (q, _expand_heads(k, h), _expand_heads(v, h), out.to(q.dtype), dout.to(q.dtype))
    )
    if len(call.aux) == 1:
        dq, dk, dv = kernel.backward(dop, qp, kp, vp, op, lse, call.aux[0], causal, scale)
    else:
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        step = kernel.max_batch(h, length, k.shape[2])
        for s, aux in zip(_chunks(b, step), call.aux, strict=True):
            dq[s], dk[s], dv[s] = kernel.backward(dop[s], qp[s], kp[s], vp[s], op[s], lse[s], aux, causal, scale)
    kv_heads = k.shape[1]
    return dq[..., :d], _reduce_heads(dk[..., :d], kv_heads), _reduce_heads(dv[..., :d], kv_heads)
