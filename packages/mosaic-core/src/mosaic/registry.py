"""Backends by name: explicit registrations and the ``mosaic.backends`` entry points.

Entry points are read once (cached) and imported only when their backend is
asked for, so a broken plugin costs a warning and breaks nobody else.
``MOSAIC_BACKEND_AUTOLOAD=0`` ignores entry points; ``register_backend``
adds or overrides a backend in code.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from .backend import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "get_backend",
    "refresh_backends",
    "register_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "mosaic.backends"

# Where the known backends live, for the install hint when one is missing.
KNOWN_BACKENDS: dict[str, str] = {
    "local": "mosaic-core",
    "auto": "mosaic-core",
    "ring": "mosaic-ring",
    "allgather": "mosaic-ring",
    "ring_flash_attn": "mosaic-ring[flash]",
    "mesh2d": "mosaic-mesh2d",
    "ulysses": "mosaic-compose",
    "composed": "mosaic-compose",
    "hierarchical": "mosaic-hier",
    "switch": "mosaic-compose",
    "magi": "mosaic-magi",
}

_registered: dict[str, Backend | type[Backend]] = {}
_instances: dict[str, Backend] = {}
_failed: dict[str, str] = {}


class BackendUnavailable(ValueError):
    """No backend of that name is installed or registered."""


def _autoload() -> bool:
    return os.environ.get("MOSAIC_BACKEND_AUTOLOAD", "1") not in ("0", "false", "False")


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def refresh_backends() -> None:
    """Forget cached entry points and instances (after installing a package, in tests)."""
    _entry_points.cache_clear()
    _instances.clear()
    _failed.clear()


def register_backend(name: str, backend: Backend | type[Backend], *, override: bool = False) -> None:
    """Make ``backend`` (an instance or a class) available as ``name``, ahead of entry points."""
    if name in _registered and not override:
        raise ValueError(f"backend {name!r} is already registered; pass override=True to replace it")
    _registered[name] = backend
    _instances.pop(name, None)


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)
    _instances.pop(name, None)


def available_backends() -> list[str]:
    """Names that can be asked for: registered ones and installed entry points (not yet imported)."""
    names = set(_registered)
    if _autoload():
        names |= set(_entry_points())
    return sorted(names)


def _instantiate(obj: Backend | type[Backend]) -> Backend:
    backend = obj() if isinstance(obj, type) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{obj!r} is not a mosaic.Backend")
    return backend


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a :class:`BackendUnavailable` with an install hint otherwise."""
    if name in _instances:
        return _instances[name]
    if name in _registered:
        backend = _instantiate(_registered[name])
    elif _autoload() and name in _entry_points():
        if name in _failed:
            raise BackendUnavailable(_failed[name])
        ep = _entry_points()[name]
        try:
            backend = _instantiate(ep.load())
        except Exception as exc:  # a broken plugin must not break the others
            message = f"backend {name!r} is installed ({ep.value}) but failed to load: {type(exc).__name__}: {exc}"
            _failed[name] = message
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            raise BackendUnavailable(message) from exc
    else:
        raise BackendUnavailable(_missing_message(name))
    _instances[name] = backend
    return backend


def _missing_message(name: str) -> str:
    installed = ", ".join(available_backends()) or "none"
    if name in KNOWN_BACKENDS:
        package = KNOWN_BACKENDS[name]
        return (
            f"backend {name!r} is provided by {package}, which is not installed: pip install {package}"
            + (" (or set MOSAIC_BACKEND_AUTOLOAD=1)" if not _autoload() else "")
            + f". Installed backends: {installed}"
        )
    known = ", ".join(f"{n} ({p})" for n, p in KNOWN_BACKENDS.items())
    return f"unknown backend {name!r}. Installed backends: {installed}. Known backends and their packages: {known}"
