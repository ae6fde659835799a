"""Mosaic: multi-axis attention sharding for PyTorch."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import torch.nn as nn

from . import kernels, sharded
from .attention import MultiAxisAttention
from .auto import AutoBackend, explain
from .backend import Backend, Capabilities, Plan
from .calibration import calibrate
from .context import Context, get_context, init, is_initialized, shutdown
from .cost import Cost, Machine, Pass
from .declarations import ShardedDim
from .errors import (
    BackendNotSupported,
    BackendUnavailable,
    CallMismatchError,
    CheckpointError,
    CollectiveTimeout,
)
from .functional import attention, prepare_layer
from .grads import check_replicas, reduce_gradients
from .layout import SeqLayout, from_zigzag, to_zigzag
from .local import LocalBackend
from .mha import MultiheadAttention
from .options import NoOptions, Options
from .problem import AttentionProblem
from .registry import (
    available_backends,
    get_backend,
    installed_backends,
    refresh_backends,
    register_backend,
    unregister_backend,
)

try:
    # The one version source is mosaic-core's pyproject.toml; every package of the repository has the same.
    __version__ = importlib.metadata.version("mosaic-core")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AttentionProblem",
    "AutoBackend",
    "Backend",
    "BackendNotSupported",
    "BackendUnavailable",
    "CallMismatchError",
    "Capabilities",
    "CheckpointError",
    "CollectiveTimeout",
    "ComposedAttention",
    "Context",
    "Cost",
    "HierarchicalAttention",
    "LocalBackend",
    "Machine",
    "MultiAxisAttention",
    "MultiAxisAttention2D",
    "MultiheadAttention",
    "NoOptions",
    "Options",
    "Pass",
    "Plan",
    "SeqLayout",
    "ShardedDim",
    "attention",
    "available_backends",
    "calibrate",
    "check_replicas",
    "explain",
    "from_zigzag",
    "get_backend",
    "get_context",
    "init",
    "installed_backends",
    "is_initialized",
    "kernels",
    "prepare",
    "reduce_gradients",
    "refresh_backends",
    "register_backend",
    "sharded",
    "shutdown",
    "to_zigzag",
    "unregister_backend",
]


def prepare(model: nn.Module) -> None:
    """Agree on the backend of every Mosaic layer in ``model`` and create their process groups, now.

    Collective over the sp group. Layers built after :func:`init` do it themselves; call this
    for a model built before it, so that no group is created in the middle of a step.
    """
    for module in model.modules():
        if isinstance(module, MultiAxisAttention):
            prepare_layer(module.backend, module.options, module.description)


# Names provided by the other packages, imported on first use.
_LAZY = {
    "ComposedAttention": ("mosaic_compose", "mosaic-compose"),
    "HierarchicalAttention": ("mosaic_hier", "mosaic-hier"),
    "MultiAxisAttention2D": ("mosaic_mesh2d", "mosaic-mesh2d"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mosaic' has no attribute {name!r}")
    module, package = _LAZY[name]
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(
            f"mosaic.{name} is provided by {package}, which is not installed: pip install {package}"
        ) from exc
    globals()[name] = value
    return value
