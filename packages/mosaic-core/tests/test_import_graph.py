"""mosaic-core's import graph: no circle, and no import up the layers docs/architecture.md declares.

Every import counts, at module level and inside functions, except those under
``if TYPE_CHECKING:`` (annotations only). A module may import its own layer
and the layers below; the layers are read from the table of
docs/architecture.md, so the document and the code can't drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import mosaic

PACKAGE = Path(mosaic.__file__).parent
DOC = Path(__file__).resolve().parents[3] / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    """Dotted names (``"kernels.fa4"``, ``""`` for the package) → files."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _typing_only(tree: ast.Module) -> set[int]:
    """Line numbers under ``if TYPE_CHECKING:``."""
    lines = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
            lines |= {n.lineno for sub in node.body for n in ast.walk(sub) if hasattr(n, "lineno")}
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (the nearest existing module of each target)."""
    tree = ast.parse(path.read_text())
    skip = _typing_only(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(["mosaic", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # A name imported from a module is that module, or a submodule of that name.
            targets += [f"{module}.{a.name}" for a in node.names]
    found = set()
    for target in targets:
        if not target.startswith("mosaic."):
            continue
        dotted = target.removeprefix("mosaic.")
        while dotted not in modules and dotted:
            dotted = dotted.rpartition(".")[0]
        if dotted in modules and dotted != name:
            found.add(dotted)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layers() -> dict[str, int]:
    """Module → layer number, from the table under "## Layers" in docs/architecture.md."""
    text = DOC.read_text().split("## Layers", 1)[1]
    layers = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", line)
        if match:
            for module in re.findall(r"`([\w.]+)`", match.group(2)):
                layers[module.removeprefix("mosaic.").removeprefix("mosaic")] = int(match.group(1))
    return layers


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    """A module's layer: its own row, or its package's (``kernels.fa4`` is in ``kernels``'s row)."""
    while module not in layers and module:
        module = module.rpartition(".")[0]
    return layers.get(module)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    missing = sorted(m or "mosaic" for m in _graph() if _layer_of(m, layers) is None)
    assert not missing, f"modules without a row in docs/architecture.md's layer table: {missing}"


def test_no_import_goes_up_a_layer() -> None:
    layers = _layers()
    upward = [
        f"mosaic.{m} (layer {_layer_of(m, layers)}) imports mosaic.{d} (layer {_layer_of(d, layers)})"
        for m, deps in sorted(_graph().items())
        for d in sorted(deps)
        if (_layer_of(d, layers) or 0) > (_layer_of(m, layers) or 0)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    "graph, circles",
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_circle_finder_finds_circles(graph: dict[str, set[str]], circles: list[list[str]]) -> None:
    assert _cycles(graph) == circles


def test_the_import_reader_sees_function_level_and_skips_typing_only(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nfrom . import comm\nif TYPE_CHECKING:\n    from .context import Context\n"
        "def f():\n    from .kernels.fa4 import x\n    import mosaic.errors\n"
    )
    modules = {"m": path, "comm": path, "context": path, "kernels": path, "kernels.fa4": path, "errors": path}
    assert _imports("m", path, modules) == {"comm", "kernels.fa4", "errors"}
