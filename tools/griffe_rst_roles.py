"""A griffe extension for the API reference: Sphinx roles in Mosaic's docstrings as Markdown code.

The docstrings cross-reference with reStructuredText roles (``:func:`init```,
``:class:`~mosaic.testing.ConformanceReport```), which Markdown would print
as written. Each role becomes inline code of the name it shows (the last
part after a ``~``), and a paragraph ending in ``::`` (a literal block
follows) ends in ``:``. mkdocs.yml loads it for mkdocstrings.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["SphinxRoles", "to_markdown"]

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::$", re.M)


def _shown(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    name = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{name}`"


def to_markdown(text: str) -> str:
    """``text`` with every Sphinx role as inline code and every ``::`` before a literal block as ``:``."""
    return _LITERAL_BLOCK.sub(r"\1:", _ROLE.sub(_shown, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring griffe loads (modules, classes, functions, attributes)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
