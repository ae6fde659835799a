"""The kernel contract: what a block kernel declares, takes and returns.

A kernel computes attention of one block of query rows over one block of key
rows in the canonical layout ``(batch, heads, rows, head_dim)``. Its forward
returns ``(out, lse, aux)``: the output, the log-sum-exp of every query row
(fp32; fp64 for fp64 inputs), and whatever its backward needs besides
tensors. Its backward takes the *final* ``out`` and ``lse`` of those query
rows — possibly merged with other key blocks — and returns this block's share
of ``dq`` and its exact ``dk``, ``dv``: nothing is recomputed and no score
matrix is kept.

Whether a kernel can run a block is decided from a :class:`BlockSpec` (device,
dtype, head dim, lengths, heads), so a plan picks each block's kernel once,
from facts every rank shares, and execution only runs it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "CUDA_MAX_BATCH_HEADS",
    "BlockSpec",
    "Kernel",
    "KernelCall",
    "cuda_capability",
    "default_scale",
    "lse_dtype",
    "round_up",
]

# Fused CUDA kernels put batch and heads on grid dimensions limited to 65535.
CUDA_MAX_BATCH_HEADS = 65535


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-sum-exp and of partial-result accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, ``None`` for other devices or without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class BlockSpec:
    """One block of attention as the kernels see it: enough to choose a kernel without tensors.

    ``heads`` query heads over ``kv_heads`` key/value heads; ``q_len`` query rows
    over ``k_len`` key rows; ``causal`` means top-left aligned (Mosaic asks it only
    of square diagonal blocks).
    """

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    q_len: int
    k_len: int
    heads: int = 1
    kv_heads: int = 1
    batch: int = 1
    causal: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor | None = None, causal: bool = False) -> BlockSpec:
        """The spec of ``q (B, H, L, d)`` over ``k (B, Hkv, S, d)`` (``k`` defaults to ``q``)."""
        k = q if k is None else k
        b, h, length, d = q.shape
        return cls(q.device, q.dtype, d, length, k.shape[2], h, k.shape[1], b, causal)

    def sized(self, q_len: int, k_len: int, causal: bool = False) -> BlockSpec:
        """This spec for a block of ``q_len`` query rows over ``k_len`` key rows."""
        return replace(self, q_len=q_len, k_len=k_len, causal=causal)


@dataclass(frozen=True)
class KernelCall:
    """What a backward needs from its forward besides tensors: the kernel and its per-chunk state."""

    kernel: str
    aux: tuple[Any, ...]


class Kernel(ABC):
    """One fused operator.

    Declarations (class attributes) say what it runs; :meth:`reasons` turns a
    :class:`BlockSpec` it can't run into sentences. Inputs arrive with the head
    dim zero-padded to ``pad_head_dim_to`` and, unless ``native_gqa``, with the
    K/V heads repeated to the query heads; in the strides the caller had when
    ``strided_inputs``, else contiguous.
    """

    name: str = ""
    device_type: str = "cuda"
    # Reads q, k, v through their strides (no contiguous copy needed, nor worth making).
    strided_inputs: bool = False
    # Takes fewer K/V heads than query heads itself; its backward returns dk, dv with the K/V heads.
    native_gqa: bool = False
    # May be picked for a block nobody named a kernel for (in the registry's order); False: only when named.
    automatic: bool = True
    dtypes: frozenset[torch.dtype] = frozenset()
    max_head_dim: int | None = None
    pad_head_dim_to: int = 1

    def unavailable(self, device: torch.device) -> list[str]:
        """Why this kernel can't run anything on ``device`` (a package missing, the wrong GPU); empty when it can."""
        if self.device_type and device.type != self.device_type:
            return [f"needs a {self.device_type} device, got {device.type}"]
        return []

    def reasons(self, spec: BlockSpec) -> list[str]:
        """Why this kernel can't run ``spec``; empty when it can."""
        out = self.unavailable(spec.device)
        if self.dtypes and spec.dtype not in self.dtypes:
            out.append(f"dtype {spec.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        width = round_up(spec.head_dim, self.pad_head_dim_to)
        if self.max_head_dim is not None and width > self.max_head_dim:
            out.append(f"head dim {spec.head_dim} > {self.max_head_dim}")
        return out + self.extra_reasons(spec)

    def extra_reasons(self, spec: BlockSpec) -> list[str]:
        """Reasons beyond the declarations; override as needed."""
        return []

    def max_batch(self, heads: int, q_len: int, k_len: int) -> int:
        """The largest batch one call may take (larger batches are cut into chunks)."""
        if self.device_type == "cuda":
            return max(1, CUDA_MAX_BATCH_HEADS // heads)
        return 1 << 62

    @abstractmethod
    def forward(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(out, lse (B, H, L), aux)`` for one batch chunk."""

    @abstractmethod
    def backward(self, dout, q, k, v, out, lse, aux, causal: bool, scale: float):
        """``(dq, dk, dv)`` for one batch chunk, given the final ``out`` and ``lse``."""
