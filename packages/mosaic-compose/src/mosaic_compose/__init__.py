"""mosaic-compose: head parallelism (``ulysses``) and head x sequence compositions (``composed``)."""

from __future__ import annotations

from .composed import ComposedAttention, ComposedBackend, ComposedOptions
from .exchange import HeadExchange
from .switch import SwitchBackend, SwitchOptions
from .ulysses import UlyssesBackend

__all__ = [
    "ComposedAttention",
    "ComposedBackend",
    "ComposedOptions",
    "HeadExchange",
    "SwitchBackend",
    "SwitchOptions",
    "UlyssesBackend",
]
