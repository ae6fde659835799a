"""Block attention kernels: ``(out, lse)`` forward and the matching backward (one room of Mosaic's core).

- :mod:`.contract` — what a kernel declares (:class:`Kernel`), the :class:`BlockSpec` it is
  chosen by, and the :class:`KernelCall` its backward gets;
- :mod:`.sdpa` (cuDNN, flash, CPU flash), :mod:`.fa4` (FlashAttention-4), :mod:`.tiny` (a
  Triton kernel for sequences of at most 64: feature attention), :mod:`.exact` (the math fallback);
- :mod:`.registry` — kernels by name, in order of preference, with those of installed packages
  (entry points ``mosaic.kernels``), and the choice of one for a block;
- :mod:`.run` — :func:`attention_forward` / :func:`attention_backward`, which every strategy is built from.

The forward returns the log-sum-exp of each query row (fp32; fp64 for fp64 inputs) so partial
results over different keys can be merged; the backward takes the *final* merged ``out`` and
``lse``, which makes the gradient of every key block exact without recomputing or storing a score
matrix. ``causal`` means top-left aligned, and callers only ask for it on square blocks whose query
and key rows sit at the same positions, so no kernel's alignment rule matters.
"""

from __future__ import annotations

from .contract import CUDA_MAX_BATCH_HEADS, BlockSpec, Kernel, KernelCall, default_scale, lse_dtype
from .exact import MathKernel
from .fa4 import Fa4Kernel
from .registry import (
    ENTRY_POINT_GROUP,
    KERNELS,
    choose_kernel,
    get_kernel,
    kernel_names,
    kernel_reasons,
    ranking,
    refresh_kernels,
    select_kernel,
)
from .run import attention_backward, attention_forward
from .sdpa import CpuFlashKernel, CudnnKernel, FlashKernel
from .tiny import TinyKernel

__all__ = [
    "CUDA_MAX_BATCH_HEADS",
    "ENTRY_POINT_GROUP",
    "KERNELS",
    "BlockSpec",
    "CpuFlashKernel",
    "CudnnKernel",
    "Fa4Kernel",
    "FlashKernel",
    "Kernel",
    "KernelCall",
    "MathKernel",
    "TinyKernel",
    "attention_backward",
    "attention_forward",
    "choose_kernel",
    "default_scale",
    "get_kernel",
    "kernel_names",
    "kernel_reasons",
    "lse_dtype",
    "ranking",
    "refresh_kernels",
    "select_kernel",
]
