"""mosaic-magi: MagiAttention's distributed attention as the ``magi`` backend (an optional engine).

Importing this package never imports MagiAttention; see :mod:`mosaic_magi.magi`.
"""

from __future__ import annotations

from .magi import INSTALL_HINT, MagiBackend, MagiOptions, MagiPlan, is_installed
from .mask import FFA_HEAD_DIMS, PackedMask, pack_mask, padded_head_dim

__all__ = [
    "FFA_HEAD_DIMS",
    "INSTALL_HINT",
    "MagiBackend",
    "MagiOptions",
    "MagiPlan",
    "PackedMask",
    "is_installed",
    "pack_mask",
    "padded_head_dim",
]
