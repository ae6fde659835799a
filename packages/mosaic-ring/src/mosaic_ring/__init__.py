"""mosaic-ring: 1-D sequence parallelism over the sp group (``ring``, ``allgather``, ``ring_flash_attn``)."""

from __future__ import annotations

from mosaic import from_zigzag, to_zigzag

from .allgather import AllGatherBackend
from .flash_engine import RingFlashAttnBackend
from .ring import RingBackend

__all__ = ["AllGatherBackend", "RingBackend", "RingFlashAttnBackend", "from_zigzag", "to_zigzag"]
