"""mosaic-magi: MagiAttention's distributed attention as the ``magi`` backend (an optional engine),
and its FFA kernel as ``local``'s ``kernel="ffa"`` (:mod:`mosaic_magi.ffa`).

Importing this package never imports MagiAttention; see :mod:`mosaic_magi.magi`.
"""

from __future__ import annotations

from .ffa import FfaKernel
from .magi import INSTALL_HINT, MagiBackend, MagiOptions, MagiPlan, is_installed
from .mask import FFA_HEAD_DIMS, PackedMask, pack_mask, padded_head_dim

__all__ = [
    "FFA_HEAD_DIMS",
    "INSTALL_HINT",
    "FfaKernel",
    "MagiBackend",
    "MagiOptions",
    "MagiPlan",
    "PackedMask",
    "is_installed",
    "pack_mask",
    "padded_head_dim",
]
