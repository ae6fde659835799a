"""mosaic-ring: 1-D sequence parallelism over the sp group (``ring`` and ``allgather``)."""

from __future__ import annotations

from mosaic.layout import from_zigzag, to_zigzag

from .allgather import AllGatherBackend
from .ring import RingBackend

__all__ = ["AllGatherBackend", "RingBackend", "from_zigzag", "to_zigzag"]
