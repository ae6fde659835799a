"""mosaic-compose: head parallelism (``ulysses``) and head x sequence compositions (``composed``)."""

from __future__ import annotations

from .composed import ComposedAttention, ComposedBackend
from .exchange import HeadExchange
from .ulysses import UlyssesBackend

__all__ = ["ComposedAttention", "ComposedBackend", "HeadExchange", "UlyssesBackend"]
