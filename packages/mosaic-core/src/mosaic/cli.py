"""Backend options from a command line: ``key=value`` strings as the values a backend's ``Options`` take.

Commands that run a backend take its options as repeatable ``key=value``
arguments (``python -m mosaic.testing mesh2d --option mesh_shape=2,2``, the
nanoTabPFN example's ``--backend-option``). A value reads as:

- a Python literal where it is one: ``2``, ``0.5``, ``(2, 2)``, ``'ring'``, ``None``;
- ``true`` / ``false`` / ``none`` in any case: ``True``, ``False``, ``None``;
- with commas, a tuple of such values: ``2,2`` is ``(2, 2)``, ``ring,allgather`` is
  ``("ring", "allgather")``; a trailing comma makes a tuple of one (``ring,``);
- anything else: the string itself (``ring``).

:func:`missing_options` and :func:`option_example` turn a backend's required
options into a one-line hint, e.g. ``mesh_shape=2,2`` for ``mesh2d`` on 4 ranks.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .backend import Backend
from .registry import get_backend

__all__ = ["format_value", "missing_options", "option_example", "parse_option", "parse_options", "parse_value"]

_WORDS = {"true": True, "false": False, "none": None}


_NOT_A_LITERAL = object()


def _literal(text: str) -> Any:
    text = text.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


def _scalar(text: str) -> Any:
    value = _literal(text)
    return text.strip() if value is _NOT_A_LITERAL else value


def parse_value(text: str) -> Any:
    """A command-line value as a Python value (the rules in this module's docstring)."""
    value = _literal(text)
    if value is not _NOT_A_LITERAL:
        return value
    if "," not in text:
        return text.strip()
    parts = text.split(",")
    if parts[-1].strip() == "":
        parts = parts[:-1]
    return tuple(_scalar(part) for part in parts)


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` as ``(key, value)``; a ``ValueError`` naming the text otherwise."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"option {text!r} is not key=value (e.g. mesh_shape=2,2 or chunks=2)")
    return key, parse_value(value)


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """Every ``"key=value"`` of ``items`` as one dict; a key given twice is a ``ValueError``."""
    options: dict[str, Any] = {}
    for item in items:
        key, value = parse_option(item)
        if key in options:
            raise ValueError(f"option {key!r} is given twice ({options[key]!r} and {value!r})")
        options[key] = value
    return options


def format_value(value: Any) -> str:
    """``value`` written the way :func:`parse_value` reads it back (``(2, 2)`` as ``2,2``)."""
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "")
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)


def _backend(backend: Backend | str) -> Backend:
    return get_backend(backend) if isinstance(backend, str) else backend


def missing_options(backend: Backend | str, given: Mapping[str, Any]) -> list[str]:
    """The options ``backend`` requires (no default) that ``given`` lacks, in declaration order."""
    return [
        f.name
        for f in dataclasses.fields(_backend(backend).Options)
        if f.init
        and f.name not in given
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]


def _factors(n: int, parts: int) -> tuple[int, ...]:
    """``n`` as ``parts`` factors, as even as possible (``4, 2`` gives ``(2, 2)``)."""
    if parts == 1:
        return (n,)
    first = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return (first, *_factors(n // first, parts - 1))


def option_example(backend: Backend | str, name: str, sp_size: int) -> str:
    """``name=value`` with a value of the option's declared type that fits an sp group of ``sp_size`` ranks.

    A tuple of ints is a factorisation of ``sp_size`` (a mesh shape), an int its
    smallest factor above 1 (ranks per node); other types get a placeholder.
    """
    hint = typing.get_type_hints(_backend(backend).Options)[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args and all(a is int or a is Ellipsis for a in args):
        return f"{name}={format_value(_factors(sp_size, 2 if Ellipsis in args else len(args)))}"
    if hint is int:
        return f"{name}={min((d for d in range(2, sp_size + 1) if sp_size % d == 0), default=1)}"
    if hint is bool:
        return f"{name}=true"
    return f"{name}=VALUE"
