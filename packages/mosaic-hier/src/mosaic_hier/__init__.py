"""mosaic-hier: an intra-node strategy x an inter-node strategy over the sp group (backend ``hierarchical``)."""

from __future__ import annotations

from .backend import HierarchicalBackend
from .module import HierarchicalAttention
from .options import HierOptions

__all__ = ["HierOptions", "HierarchicalAttention", "HierarchicalBackend"]
