"""Typed backend options: one frozen dataclass per backend, checked when a module is built.

A backend declares ``Options = MyOptions`` (a subclass of :class:`Options`,
decorated ``@dataclass(frozen=True)``). :meth:`Options.parse` turns the
keyword arguments a user gave (``MultiAxisAttention(backend_options=...)``,
``set_backend(name, **options)``, ``mosaic.attention(options=...)``) into an
instance: an unknown field raises a ``ValueError`` that lists the valid ones,
and the subclass's ``__post_init__`` checks values, naming the bad one. The
instance is hashable (plans are cached by it) and has a stable
:meth:`Options.digest`, which the ranks of the sp group compare so that
different options on different ranks fail on every rank instead of running
mismatched schedules.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["NoOptions", "Options", "check_positive_int", "check_shape"]


@dataclass(frozen=True)
class Options:
    """Base of every backend's options."""

    backend: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The options a user sets (fields derived in ``__post_init__`` are ``init=False``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def parse(cls, backend: str, values: Options | Mapping[str, Any] | None = None) -> Options:
        """``values`` as this class; a ``ValueError`` naming every unknown field and the valid ones."""
        if isinstance(values, cls):
            return values
        if isinstance(values, Options):
            raise ValueError(f"backend {backend!r} takes {cls.__name__}, got {type(values).__name__}")
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            valid = ", ".join(cls.field_names()) or "none"
            raise ValueError(
                f"backend {backend!r} has no option {', '.join(map(repr, unknown))} (its options: {valid})"
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        if missing:
            raise ValueError(f"backend {backend!r} needs option(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"backend {backend!r}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """The options as set (what :meth:`parse` takes back)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def digest(self) -> int:
        """A hash that is the same in every process for equal options (Python's ``hash`` is salted)."""
        return zlib.crc32(repr((type(self).__name__, sorted(self.as_dict().items()))).encode())

    def __str__(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())


@dataclass(frozen=True)
class NoOptions(Options):
    """A backend without options."""


def check_positive_int(name: str, value: Any) -> None:
    """A ``ValueError`` naming option ``name`` unless ``value`` is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option {name} must be a positive int, got {value!r}")


def check_shape(name: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints (of ``length`` entries when given)."""
    if not isinstance(value, tuple | list) or any(isinstance(n, bool) or not isinstance(n, int) for n in value):
        raise ValueError(f"option {name} must be a tuple of ints, got {value!r}")
    shape = tuple(value)
    if (length is not None and len(shape) != length) or any(n < 1 for n in shape):
        what = f"{length} positive ints" if length else "positive ints"
        raise ValueError(f"option {name} must be {what}, got {value!r}")
    return shape
