"""Every error class of Mosaic, in one room that imports nothing of Mosaic's.

Errors that the ranks of a group agree on are raised with the same type and
message on every rank (:mod:`mosaic.agreement`); the classes below are what
a user catches.
"""

from __future__ import annotations

__all__ = [
    "RULE",
    "BackendNotSupported",
    "BackendUnavailable",
    "CallMismatchError",
    "CheckpointError",
    "CollectiveTimeout",
    "PluginFailed",
]

# The rule that a skipped call or backward breaks, quoted by the errors that catch it.
RULE = (
    "every rank of the sp group must run every sharded layer, forward and backward, in the same order: "
    "a rank that skips a call, catches an exception and goes on, or whose loss does not depend on a "
    "layer's output (so its backward skips that layer) breaks it"
)


class BackendNotSupported(ValueError):
    """The chosen backend can't run this input; the message lists why."""


class BackendUnavailable(ValueError):
    """No backend of that name is installed or registered (the message names the package to install)."""


class PluginFailed(ImportError):
    """An installed entry point (a backend or kernel of another package) could not be imported."""


class CallMismatchError(RuntimeError):
    """The ranks of a group are not at the same sharded call (one skipped a call, a backward or a step)."""


class CollectiveTimeout(TimeoutError):
    """The ranks of a group did not all reach a sharded call (or its collectives) in time."""


class CheckpointError(RuntimeError):
    """A distributed checkpoint could not be saved or loaded; the message carries torch's reasons.

    ``torch.distributed.checkpoint`` raises ``CheckpointException``, a ``BaseException``
    that ``except Exception`` does not catch; Mosaic's checkpoint functions raise this instead.
    """
