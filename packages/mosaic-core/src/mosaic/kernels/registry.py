"""Kernels by name, in order of preference, and the choice of one for a block.

The built-in kernels, fastest first where each applies: ``tiny`` (short
sequences: feature attention), ``fa4`` (FlashAttention-4 on Hopper and
Blackwell, when flash-attn-4 is installed), ``cudnn``, ``flash``,
``cpu_flash``, and the exact ``math`` fallback. Packages add kernels through
the entry points ``mosaic.kernels`` (a :class:`~mosaic.kernels.Kernel`
subclass named like its entry point); they join before the math fallback,
and one with ``automatic = False`` runs only where it is named (``local``'s
``kernel`` option), or where ``MOSAIC_KERNEL=<name>`` puts every block it can
run (benchmarks, debugging).
"""

from __future__ import annotations

import os

import torch

from ..errors import PluginFailed
from ..plugins import EntryPoints
from .contract import BlockSpec, Kernel
from .exact import MathKernel
from .fa4 import Fa4Kernel
from .sdpa import CpuFlashKernel, CudnnKernel, FlashKernel
from .tiny import TinyKernel

__all__ = [
    "ENTRY_POINT_GROUP",
    "KERNELS",
    "choose_kernel",
    "get_kernel",
    "kernel_names",
    "kernel_reasons",
    "ranking",
    "refresh_kernels",
    "select_kernel",
]

ENTRY_POINT_GROUP = "mosaic.kernels"

_BUILT_IN: tuple[Kernel, ...] = (
    TinyKernel(), Fa4Kernel(), CudnnKernel(), FlashKernel(), CpuFlashKernel(), MathKernel(),
)  # fmt: skip
# In order of preference; kernels of installed packages join before the math fallback when first asked for.
KERNELS: dict[str, Kernel] = {k.name: k for k in _BUILT_IN}
_plugins = EntryPoints(ENTRY_POINT_GROUP, "kernel")
_plugins_loaded = False


def _load_plugins() -> None:
    """Add the kernels of ``mosaic.kernels`` entry points (once); a broken one warns and is skipped."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    found: dict[str, Kernel] = {}
    for name in _plugins.names():
        if name in KERNELS:
            continue
        try:
            kernel = _plugins.load(name)()
        except PluginFailed:
            continue
        if not isinstance(kernel, Kernel) or kernel.name != name:
            import warnings

            warnings.warn(f"kernel {name!r} ({_plugins.value(name)}) is not a mosaic.kernels.Kernel named {name!r}",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            continue
        found[name] = kernel
    if found:
        math_kernel = KERNELS.pop("math")
        KERNELS.update(found)
        KERNELS["math"] = math_kernel


def refresh_kernels() -> None:
    """Forget the kernels of packages (found again on next use): after installing one, in tests."""
    global _plugins_loaded
    for name in [n for n in KERNELS if n not in {k.name for k in _BUILT_IN}]:
        del KERNELS[name]
    _plugins.refresh()
    _plugins_loaded = False


def kernel_names() -> list[str]:
    """Every kernel that can be named: the built-in ones and those of installed packages, in order of preference."""
    _load_plugins()
    return list(KERNELS)


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``; a ``ValueError`` listing the known ones otherwise."""
    _load_plugins()
    if name not in KERNELS:
        raise ValueError(f"kernel {name!r} is not one of {list(KERNELS)} (packages add kernels: mosaic-magi's 'ffa')")
    return KERNELS[name]


def kernel_reasons(spec: BlockSpec | torch.Tensor, k: torch.Tensor | None = None) -> dict[str, list[str]]:
    """For every kernel, why it can't run ``spec`` (or ``q`` against ``k``); an empty list: it can."""
    _load_plugins()
    spec = spec if isinstance(spec, BlockSpec) else BlockSpec.of(spec, k)
    return {name: kernel.reasons(spec) for name, kernel in KERNELS.items()}


def choose_kernel(spec: BlockSpec, name: str | None = None) -> Kernel:
    """The kernel for ``spec``: ``name`` if given, else the first automatic kernel that accepts it.

    A named kernel that can't run the block is an error saying why. ``MOSAIC_KERNEL=<name>`` puts
    every block that kernel can run on it (benchmarks compare kernels this way: ``MOSAIC_KERNEL=cudnn``
    is the cuDNN path) and leaves the others, an fp32 reference say, to the automatic choice.
    """
    if name:
        return _named(name, spec, f"kernel={name!r}")
    _load_plugins()
    if forced := os.environ.get("MOSAIC_KERNEL"):
        kernel = _named(forced, spec, f"MOSAIC_KERNEL={forced}", check=False)
        if not kernel.reasons(spec):
            return kernel
    for kernel in KERNELS.values():
        if kernel.automatic and not kernel.reasons(spec):
            return kernel
    raise AssertionError("the math kernel accepts every input")


def select_kernel(q: torch.Tensor, k: torch.Tensor | None = None, name: str | None = None) -> Kernel:
    """:func:`choose_kernel` for ``q`` against ``k`` (tensors instead of a spec)."""
    return choose_kernel(BlockSpec.of(q, k), name)


def ranking(spec: BlockSpec, chosen: str | None = None) -> list[tuple[str, str]]:
    """Every kernel with what became of it for ``spec`` (``chosen``: the one a plan picked, default the one
    :func:`choose_kernel` picks): ``"chosen"``, or why not — for ``mosaic.explain`` and the doctor."""
    chosen = chosen or choose_kernel(spec).name
    out = []
    for kernel_name, kernel in KERNELS.items():
        reasons = kernel.reasons(spec)
        if kernel_name == chosen:
            out.append((kernel_name, "chosen"))
        elif reasons:
            out.append((kernel_name, "; ".join(reasons)))
        elif not kernel.automatic:
            out.append((kernel_name, "can run it; runs only where named (kernel=...)"))
        else:
            out.append((kernel_name, f"can run it; {chosen} comes first"))
    return out


def _named(name: str, spec: BlockSpec, source: str, check: bool = True) -> Kernel:
    try:
        kernel = get_kernel(name)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    reasons = kernel.reasons(spec) if check else []
    if reasons:
        raise RuntimeError(f"{source} can't run this input: {'; '.join(reasons)}")
    return kernel
