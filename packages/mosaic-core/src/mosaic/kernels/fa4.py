"""FlashAttention-4 (the ``flash-attn-4`` package, FlashAttention's CuTe-DSL kernels) as a block kernel.

On an H200 it runs nanoTabPFN's row attention (11 x 4 heads x 150,000 queries
x 75,000 keys, head dim 24, bf16, forward + backward) in 596 ms where cuDNN
takes 999 (docs/kernels.md), so it comes before cuDNN wherever it runs:
Hopper and Blackwell GPUs with the package installed (``pip install
"mosaic-core[fa4]"``). It is imported the first time a block on such a GPU is
planned, never at ``import mosaic``.

FA4 takes ``(batch, rows, heads, head_dim)`` tensors; Mosaic's
``(batch, heads, rows, head_dim)`` are views of the projections'
``(batch, rows, heads, head_dim)`` memory, so the transpose back is a view and
nothing is copied: FA4 reads any layout whose last stride is 1 and whose other
strides are 16-byte multiples. It takes fewer K/V heads than query heads itself
(GQA), returns the fp32 log-sum-exp of every query row, writes ``out`` in
``(batch, rows, heads, head_dim)`` order (what the output projection reads),
and its backward takes a given ``out`` and ``lse``, which is the contract's
merged-result backward. Head dims that are not a multiple of 8 are zero-padded
by the caller (``pad_head_dim_to``) in the one copy that makes them contiguous.

FA4's kernel entry points are underscore functions of a young package
(``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd``): the
versions Mosaic was tested with are pinned by the extra, and when an installed
version lacks a parameter Mosaic passes, the error names the function.
"""

from __future__ import annotations

import inspect
import types
from functools import cache
from importlib import metadata

import torch

from .contract import BlockSpec, Kernel, cuda_capability, round_up

__all__ = ["DISTRIBUTION", "TESTED_VERSIONS", "Fa4Kernel", "check_api", "interface"]

DISTRIBUTION = "flash-attn-4"
# The versions whose kernels passed Mosaic's GPU tests (tests/gpu, test_kernels.py on an H200).
TESTED_VERSIONS = ("4.0.0b36",)
INSTALL_HINT = 'pip install "mosaic-core[fa4]"'
# What Mosaic passes to FA4's entry points, by function.
_PARAMETERS = {
    "_flash_attn_fwd": ("q", "k", "v", "softmax_scale", "causal", "return_lse"),
    "_flash_attn_bwd": ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal"),
}
# Compute capability majors where FA4 runs forward and backward and was measured faster than cuDNN
# (Hopper; Blackwell's sm100/sm110 kernels are FA4's own first target).
_MAJORS = {9: "Hopper", 10: "Blackwell", 11: "Blackwell"}


@cache
def installed_version() -> str | None:
    """The installed flash-attn-4 version, read from its metadata (nothing is imported)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def check_api(module: types.ModuleType) -> None:
    """Raise, naming the function, when ``module`` (FA4's interface) lacks what Mosaic calls."""
    for name, wanted in _PARAMETERS.items():
        function = getattr(module, name, None)
        where = f"{module.__name__}.{name}"
        if function is None:
            raise RuntimeError(f"{DISTRIBUTION} {installed_version()} has no {where}, which Mosaic's fa4 kernel "
                               f"calls; Mosaic is tested with {DISTRIBUTION} {', '.join(TESTED_VERSIONS)} "
                               f"({INSTALL_HINT})")  # fmt: skip
        missing = [p for p in wanted if p not in inspect.signature(function).parameters]
        if missing:
            raise RuntimeError(f"{DISTRIBUTION} {installed_version()} changed {where}: it has no parameter(s) "
                               f"{', '.join(missing)}, which Mosaic's fa4 kernel passes; Mosaic is tested with "
                               f"{DISTRIBUTION} {', '.join(TESTED_VERSIONS)} ({INSTALL_HINT})")  # fmt: skip


@cache
def interface() -> types.ModuleType:
    """``flash_attn.cute.interface``, imported on first use and checked (:func:`check_api`)."""
    import flash_attn.cute.interface as module

    check_api(module)
    return module


@cache
def _import_failure() -> str | None:
    try:
        interface()
    except Exception as exc:  # an install without its CUDA libraries, or a changed API
        return f"flash-attn-4 does not load: {type(exc).__name__}: {exc}"
    return None


def _width_reasons(width: int, major: int) -> list[str]:
    if major == 9 and not 8 <= width <= 256:
        return [f"head dim {width} is outside 8..256 (FA4 on Hopper)"]
    if major in (10, 11) and not (8 <= width <= 128 or width == 256):
        return [f"head dim {width} is outside 8..128 and not 256 (FA4 on Blackwell)"]
    return []


class Fa4Kernel(Kernel):
    """FlashAttention-4 on Hopper and Blackwell: strided inputs, native GQA, fp32 lse."""

    name = "fa4"
    strided_inputs = True
    native_gqa = True
    dtypes = frozenset({torch.float16, torch.bfloat16})
    pad_head_dim_to = 8

    def unavailable(self, device: torch.device) -> list[str]:
        out = super().unavailable(device)
        version = installed_version()
        if version is None:
            return [*out, f"{DISTRIBUTION} is not installed ({INSTALL_HINT})"]
        if version not in TESTED_VERSIONS:
            return [*out, f"{DISTRIBUTION} {version} is installed; Mosaic's fa4 kernel is tested with "
                          f"{', '.join(TESTED_VERSIONS)} ({INSTALL_HINT})"]  # fmt: skip
        if out:
            return out
        capability = cuda_capability(device)
        if capability is None:
            return ["CUDA is not available"]
        if capability[0] not in _MAJORS:
            return [f"runs on Hopper (sm90) and Blackwell (sm100, sm110) GPUs; this one is sm{capability[0]}"
                    f"{capability[1]}"]  # fmt: skip
        failure = _import_failure()
        return [failure] if failure else []

    def extra_reasons(self, spec: BlockSpec) -> list[str]:
        capability = cuda_capability(spec.device)
        if capability is None or spec.heads % max(1, spec.kv_heads):
            return []
        return _width_reasons(round_up(spec.head_dim, self.pad_head_dim_to), capability[0])

    def forward(self, q, k, v, causal, scale):
        out, lse, *_ = interface()._flash_attn_fwd(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=scale,
            causal=causal,
            return_lse=True,
        )
        return out.transpose(1, 2), lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        dq, dk, dv, *_ = interface()._flash_attn_bwd(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.transpose(1, 2),
            dout.transpose(1, 2),
            lse,
            softmax_scale=scale,
            causal=causal,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
