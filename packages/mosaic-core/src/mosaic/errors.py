"""Errors that every rank of a group raises together."""

from __future__ import annotations

__all__ = ["RULE", "CallMismatchError", "CollectiveTimeout"]

# The rule that a skipped call or backward breaks, quoted by the errors that catch it.
RULE = (
    "every rank of the sp group must run every sharded layer, forward and backward, in the same order: "
    "a rank that skips a call, catches an exception and goes on, or whose loss does not depend on a "
    "layer's output (so its backward skips that layer) breaks it"
)


class CallMismatchError(RuntimeError):
    """The ranks of a group are not at the same sharded call (one skipped a call or a backward)."""


class CollectiveTimeout(TimeoutError):
    """The ranks of a group did not all reach a sharded call (or its collectives) in time."""
