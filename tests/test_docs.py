"""The API reference (docs/api/, built by ``nox -s docs``) has an entry for every public name.

A public name is one in the ``__all__`` of ``mosaic``, ``mosaic.sharded``,
``mosaic.training``, ``mosaic.testing``, ``mosaic.cli`` or a strategy
package; an entry is a ``::: dotted.path`` line of a page, and it covers the
name when both are the same object. The build itself (``mkdocs build
--strict``) is the docs session's.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import mosaic

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
MODULES = [
    "mosaic",
    "mosaic.sharded",
    "mosaic.training",
    "mosaic.testing",
    "mosaic.cli",
    "mosaic.kernels",
    "mosaic.sdk",
]
PACKAGES = [
    "mosaic_ring", "mosaic_mesh2d", "mosaic_compose", "mosaic_hier", "mosaic_magi",
    "mosaic_tabular", "mosaic_tabular.tabpfn", "mosaic_tabular.tabicl",
]  # fmt: skip


def importable(name: str) -> bool:
    """Installed, with what it imports (mosaic_tabular.tabpfn needs tabpfn)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def entries() -> dict[str, Any]:
    found = {}
    for page in sorted(API.glob("*.md")):
        for path in re.findall(r"^::: (\S+)$", page.read_text(), re.M):
            found[path] = resolve(path)
    return found


def public_names() -> dict[str, Any]:
    """Every public name as ``module.name``, with its object; modules in ``__all__`` count through their own."""
    names = {}
    for module_name in MODULES + [p for p in PACKAGES if importable(p)]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                names[f"{module_name}.{name}"] = obj
    return names


def test_every_public_name_has_an_entry() -> None:
    documented = [id(obj) for obj in entries().values()]
    missing = sorted(name for name, obj in public_names().items() if id(obj) not in documented)
    assert not missing, f"public names without an entry in docs/api/: {missing}"


def test_every_entry_is_public() -> None:
    """No page documents a name that is gone or private (a stale entry would also fail the build)."""
    public = {id(obj) for obj in public_names().values()}
    modules = {importlib.import_module(m) for m in MODULES + PACKAGES if importable(m)}
    stale = [path for path, obj in entries().items() if id(obj) not in public and obj not in modules]
    # A method given its own entry (for its own docstring options) belongs to a public class.
    stale = [p for p in stale if not inspect.isclass(resolve(p.rsplit(".", 1)[0]))]
    assert not stale, stale


def _own_docstring(obj: Any) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    # A dataclass without a docstring gets its signature as one.
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc


def _undocumented() -> set[str]:
    return {
        name
        for name, obj in public_names().items()
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _own_docstring(obj)
    }


def test_every_public_class_and_function_has_a_docstring() -> None:
    assert not _undocumented(), sorted(_undocumented())


def test_shardeddim_documents_every_attribute() -> None:
    doc = mosaic.ShardedDim.__doc__
    section = doc[doc.index("Attributes:") :]
    fields = [f.name for f in dataclasses.fields(mosaic.ShardedDim)]
    properties = [n for n, v in vars(mosaic.ShardedDim).items() if isinstance(v, property)]
    for name in fields + properties:
        assert re.search(rf"^\s+{name}: \S", section, re.M), name
    for name in properties:
        assert getattr(mosaic.ShardedDim, name).__doc__, name


# Dotted names the docs use that are not Python objects: the entry-point groups.
NOT_OBJECTS = {"mosaic.backends", "mosaic.kernels"}
FILE_SUFFIXES = {"md", "py", "json", "toml", "png", "txt", "log"}
NAME = re.compile(r"(?<![\w/.-])(mosaic(?:_[a-z0-9]+)?(?:\.[A-Za-z_]\w*)+)")


def doc_names() -> dict[str, list[str]]:
    """Every dotted ``mosaic.…`` / ``mosaic_<pkg>.…`` name in README.md and docs/, with where it appears."""
    found: dict[str, list[str]] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in NAME.findall(line):
                if name.rsplit(".", 1)[1] not in FILE_SUFFIXES:  # a file name (mosaic_ring.md), not an object
                    found.setdefault(name, []).append(f"{page.relative_to(ROOT)}:{number}")
    return found


def _resolves(name: str) -> bool:
    if name.endswith(".__main__"):  # a command (importing it runs it)
        return importlib.util.find_spec(name) is not None
    try:
        resolve(name)
    except (ImportError, AttributeError):
        return False
    return True


def test_every_mosaic_name_in_the_docs_resolves() -> None:
    """A name the README or a page mentions (``mosaic.sharded.std``, ``mosaic_ring.RingBackend``) exists."""
    missing = {n: where for n, where in doc_names().items() if n not in NOT_OBJECTS and not _resolves(n)}
    assert not missing, "\n".join(f"{n}: {', '.join(w[:3])}" for n, w in sorted(missing.items()))
