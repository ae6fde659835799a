"""Mosaic: multi-axis attention sharding for PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

from .attention import MultiAxisAttention
from .backend import Backend, BackendNotSupported, Capabilities
from .context import Context, get_context, init, is_initialized, shutdown
from .grads import reduce_gradients
from .layout import SeqLayout, from_zigzag, to_zigzag
from .local import LocalBackend
from .problem import AttentionProblem
from .registry import (
    BackendUnavailable,
    available_backends,
    get_backend,
    refresh_backends,
    register_backend,
    unregister_backend,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionProblem",
    "Backend",
    "BackendNotSupported",
    "BackendUnavailable",
    "Capabilities",
    "ComposedAttention",
    "Context",
    "HierarchicalAttention",
    "LocalBackend",
    "MultiAxisAttention",
    "MultiAxisAttention2D",
    "SeqLayout",
    "available_backends",
    "from_zigzag",
    "get_backend",
    "get_context",
    "init",
    "is_initialized",
    "reduce_gradients",
    "refresh_backends",
    "register_backend",
    "shutdown",
    "to_zigzag",
    "unregister_backend",
]

register_backend("local", LocalBackend)

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
