"""mosaic-mesh2d: 2-D tile attention (backend ``mesh2d``) and ``MultiAxisAttention2D``."""

from __future__ import annotations

from .attention2d import MultiAxisAttention2D
from .grid import GridLayout, shard_grid, unshard_grid
from .mesh2d import Mesh2DBackend, Mesh2DOptions, comm_bytes

__all__ = [
    "GridLayout",
    "Mesh2DBackend",
    "Mesh2DOptions",
    "MultiAxisAttention2D",
    "comm_bytes",
    "shard_grid",
    "unshard_grid",
]
