"""Backends by name: the built-in ones, explicit registrations and the ``mosaic.backends`` entry points.

The built-in backends (``local``, ``auto``) and those of installed packages
are named by ``module:attribute`` strings and imported only when asked for
(:class:`mosaic.plugins.EntryPoints`, the loader the kernels use too), so a
broken plugin costs a warning and breaks nobody else.
``MOSAIC_BACKEND_AUTOLOAD=0`` ignores entry points; ``register_backend``
adds or overrides a backend in code.
"""

from __future__ import annotations

import importlib
import os

import torch

from .backend import Backend
from .errors import BackendUnavailable, PluginFailed
from .plugins import EntryPoints

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_BACKENDS",
    "available_backends",
    "get_backend",
    "installed_backends",
    "refresh_backends",
    "register_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "mosaic.backends"

# mosaic-core's own backends: always there, imported on first use like the others.
_BUILT_IN = {"local": "mosaic.local:LocalBackend", "auto": "mosaic.auto:AutoBackend"}

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
_plugins = EntryPoints(ENTRY_POINT_GROUP, "backend")


def _autoload() -> bool:
    return os.environ.get("MOSAIC_BACKEND_AUTOLOAD", "1") not in ("0", "false", "False")


def refresh_backends() -> None:
    """Forget cached entry points and instances (after installing a package, in tests)."""
    _plugins.refresh()
    _instances.clear()


def register_backend(name: str, backend: Backend | type[Backend], *, override: bool = False) -> None:
    """Make ``backend`` (an instance or a class) available as ``name``, ahead of entry points."""
    if (name in _registered or name in _BUILT_IN) and not override:
        raise ValueError(f"backend {name!r} is already registered; pass override=True to replace it")
    _registered[name] = backend
    _instances.pop(name, None)


def unregister_backend(name: str) -> None:
    """Forget a backend :func:`register_backend` made available (entry points and built-ins stay)."""
    _registered.pop(name, None)
    _instances.pop(name, None)


def installed_backends() -> list[str]:
    """Every backend that can be asked for by name, whether or not it can run on this machine."""
    names = set(_registered) | set(_BUILT_IN)
    if _autoload():
        names |= set(_plugins.names())
    return sorted(names)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The installed backends that can run on ``device`` (default: CUDA when it is available, else CPU).

    A backend that declares other devices only (``magi`` and ``ring_flash_attn`` need CUDA),
    fails to import or misses the engine it wraps (:meth:`Backend.environment_reasons`: MagiAttention,
    ring-flash-attn) is left out; :func:`installed_backends` lists every name, and
    ``python -m mosaic`` says why each one can or can't run here.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    out = []
    for name in installed_backends():
        try:
            backend = get_backend(name)
        except BackendUnavailable:
            continue
        if kind in backend.capabilities.devices and not backend.environment_reasons():
            out.append(name)
    return out


def _instantiate(obj: object) -> Backend:
    backend = obj() if isinstance(obj, type) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{obj!r} is not a mosaic.Backend")
    return backend


def _built_in(name: str) -> Backend:
    module, attribute = _BUILT_IN[name].split(":")
    return _instantiate(getattr(importlib.import_module(module), attribute))


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a :class:`BackendUnavailable` with an install hint otherwise."""
    if name in _instances:
        return _instances[name]
    if name in _registered:
        backend = _instantiate(_registered[name])
    elif name in _BUILT_IN:
        backend = _built_in(name)
    elif _autoload() and name in _plugins:
        try:
            backend = _instantiate(_plugins.load(name))
        except PluginFailed as exc:
            raise BackendUnavailable(str(exc)) from exc
        except TypeError as exc:
            raise BackendUnavailable(f"backend {name!r} ({_plugins.value(name)}): {exc}") from exc
    else:
        raise BackendUnavailable(_missing_message(name))
    _instances[name] = backend
    return backend


def _missing_message(name: str) -> str:
    installed = ", ".join(installed_backends()) or "none"
    if name in KNOWN_BACKENDS:
        package = KNOWN_BACKENDS[name]
        return (
            f"backend {name!r} is provided by {package}, which is not installed: pip install {package}"
            + (" (or set MOSAIC_BACKEND_AUTOLOAD=1)" if not _autoload() else "")
            + f". Installed backends: {installed}"
        )
    known = ", ".join(f"{n} ({p})" for n, p in KNOWN_BACKENDS.items())
    return f"unknown backend {name!r}. Installed backends: {installed}. Known backends and their packages: {known}"
