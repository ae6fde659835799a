"""The settings of a hierarchy and their checks, usable without a process group.

``backend_options`` of the ``hierarchical`` backend:

- ``intra_node_size`` (required): ``L``, the ranks of one node; contiguous sp
  ranks form a node, so it must divide the sp size.
- ``inter_node_strategy``: ``"ring"`` (default) or ``"allgather"``, run over
  the rails (the ranks with the same local rank on every node).
- ``intra_node_strategy``: ``"allgather"`` (default), ``"ring"`` or
  ``"ulysses"``, run within each node.

Under torchrun ``LOCAL_WORLD_SIZE`` is the real node size; a smaller ``L``
that divides it simulates several nodes on one host (how the package is tested).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from mosaic.sdk import Options

__all__ = [
    "INTER_STRATEGIES",
    "INTRA_STRATEGIES",
    "HierOptions",
    "local_world_mismatch",
    "option_reasons",
    "warn_local_world",
]

INTER_STRATEGIES = ("ring", "allgather")
INTRA_STRATEGIES = ("ring", "allgather", "ulysses")
_KEYS = ("intra_node_size", "inter_node_strategy", "intra_node_strategy")


def option_reasons(options: Mapping[str, Any]) -> list[str]:
    """Why ``options`` do not describe a hierarchy; empty when they do."""
    reasons = [
        f"unknown backend option {key!r} (the hierarchical backend takes {', '.join(_KEYS)})"
        for key in options
        if key not in _KEYS
    ]
    size = options.get("intra_node_size")
    if size is None:
        reasons.append(
            "needs backend_options={'intra_node_size': L} with L the ranks per node (e.g. torchrun's LOCAL_WORLD_SIZE)"
        )
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        reasons.append(f"intra_node_size must be a positive int, got {size!r}")
    inter = options.get("inter_node_strategy", "ring")
    if inter not in INTER_STRATEGIES:
        reasons.append(f"inter_node_strategy {inter!r} is not one of {INTER_STRATEGIES}")
    intra = options.get("intra_node_strategy", "allgather")
    if intra not in INTRA_STRATEGIES:
        reasons.append(f"intra_node_strategy {intra!r} is not one of {INTRA_STRATEGIES}")
    return reasons


@dataclass(frozen=True)
class HierOptions(Options):
    """A checked hierarchy: ``intra_node_size`` ranks per node and the strategy of each level."""

    intra_node_size: int
    inter_node_strategy: str = "ring"
    intra_node_strategy: str = "allgather"

    def __post_init__(self) -> None:
        reasons = option_reasons(self.as_dict())
        if reasons:
            raise ValueError("invalid hierarchy: " + "; ".join(reasons))

    def nodes(self, sp_size: int) -> int:
        """Nodes in an sp group of ``sp_size`` ranks."""
        return sp_size // self.intra_node_size


def local_world_mismatch(intra_node_size: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """A warning when torchrun's ``LOCAL_WORLD_SIZE`` says the nodes are not ``intra_node_size`` ranks."""
    value = environ.get("LOCAL_WORLD_SIZE")
    if value is None or int(value) == intra_node_size:
        return None
    local = int(value)
    if local % intra_node_size == 0:
        return (
            f"intra_node_size={intra_node_size} is smaller than LOCAL_WORLD_SIZE={local}: each host runs "
            f"{local // intra_node_size} simulated nodes, whose 'inter-node' traffic stays on the host; "
            f"on a real cluster use intra_node_size={local}"
        )
    return (
        f"intra_node_size={intra_node_size} does not divide LOCAL_WORLD_SIZE={local}: some intra-node groups "
        f"span two hosts, so the intra-node strategy's traffic crosses the network; use intra_node_size={local}"
    )


@cache
def warn_local_world(intra_node_size: int, local_world_size: str | None) -> None:
    """Warn once per process and setting about :func:`local_world_mismatch`."""
    env = {} if local_world_size is None else {"LOCAL_WORLD_SIZE": local_world_size}
    message = local_world_mismatch(intra_node_size, env)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
