"""What the sharded estimators share: Mosaic's context, the device of this rank, a ``backend`` parameter."""

from __future__ import annotations

import inspect
import os

import mosaic

__all__ = ["ensure_context", "with_backend_parameter"]


def ensure_context() -> mosaic.Context:
    """Mosaic's context: the one ``mosaic.init`` made, or one over every process of the launch (torchrun's world)."""
    if not mosaic.is_initialized():
        mosaic.init(sp_size=int(os.environ.get("WORLD_SIZE", "1")))
    return mosaic.get_context()


def with_backend_parameter(cls: type) -> type:
    """Give an estimator class a keyword ``backend="auto"`` (the Mosaic strategy over rows).

    scikit-learn reads an estimator's parameters from its ``__init__`` signature
    (``get_params``, ``clone``); the package's parameters are kept as they are, and
    ``backend`` is added after them.
    """
    base_init = super(cls, cls).__init__  # the package estimator's

    def __init__(self, *args, backend: str = "auto", **kwargs):
        base_init(self, *args, **kwargs)
        self.backend = backend

    signature = inspect.signature(base_init)
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="str")
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), backend])
    __init__.__doc__ = base_init.__doc__
    cls.__init__ = __init__
    return cls
