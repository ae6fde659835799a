"""Entry points of installed packages, read once and imported only when asked for.

Backends (``mosaic.backends``) and kernels (``mosaic.kernels``) come from
other packages through entry points. Both registries use one
:class:`EntryPoints` loader: the group is read once (cached; :meth:`refresh`
forgets it after an install or in tests), an entry point is imported the
first time its name is asked for, and an import that fails becomes one
message, remembered, so a broken plugin costs a warning and breaks nobody
else (as xarray's engines and fsspec's implementations do).
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PluginFailed

__all__ = ["EntryPoints"]


class EntryPoints:
    """The entry points of ``group``; ``what`` names one of them in messages ("backend", "kernel")."""

    def __init__(self, group: str, what: str):
        self.group, self.what = group, what
        self._found: dict[str, EntryPoint] | None = None
        self._failed: dict[str, str] = {}

    def _entries(self) -> dict[str, EntryPoint]:
        if self._found is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                found.setdefault(ep.name, ep)  # the first installed wins, as importlib lists them
            self._found = found
        return self._found

    def names(self) -> list[str]:
        """Every entry point's name (nothing is imported)."""
        return sorted(self._entries())

    def __contains__(self, name: str) -> bool:
        return name in self._entries()

    def value(self, name: str) -> str:
        """Where entry point ``name`` points (``module:attribute``)."""
        return self._entries()[name].value

    def load(self, name: str) -> Any:
        """The object entry point ``name`` names; a :class:`PluginFailed` (remembered) when it does not import."""
        if name in self._failed:
            raise PluginFailed(self._failed[name])
        ep = self._entries()[name]
        try:
            return ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            message = f"{self.what} {name!r} is installed ({ep.value}) but failed to load: {type(exc).__name__}: {exc}"
            self._failed[name] = message
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            raise PluginFailed(message) from exc

    def refresh(self) -> None:
        """Read the group again on next use (after installing a package, in tests)."""
        self._found = None
        self._failed.clear()
