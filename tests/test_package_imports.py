"""The strategy and model packages reach the core through its two public doors only: ``mosaic`` and ``mosaic.sdk``.

Every import of a ``mosaic.`` module in packages/*/src (module level or
inside a function) must name ``mosaic`` itself or ``mosaic.sdk``; anything
else is a core module the core is free to change (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "src").is_dir() and p.name != "mosaic-core")
DOORS = {"mosaic", "mosaic.sdk"}


def core_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``mosaic`` module in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mosaic"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "mosaic":
            found.append((node.lineno, node.module))
            if node.module == "mosaic":  # ``from mosaic import comm`` names a module too
                found += [(node.lineno, f"mosaic.{a.name}") for a in node.names if a.name[:1].islower()
                          and (ROOT / "packages/mosaic-core/src/mosaic" / f"{a.name}.py").exists()]  # fmt: skip
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_imports_only_mosaic_and_the_sdk(package: Path) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((package / "src").rglob("*.py"))
        for line, module in core_imports(path.read_text())
        if module not in DOORS
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_core_module_anywhere() -> None:
    source = "import mosaic\nfrom mosaic.sdk import Plan\ndef f():\n    from mosaic.comm import rotate\n" \
             "from mosaic import comm, attention\n"  # fmt: skip
    assert sorted(m for _, m in core_imports(source) if m not in DOORS) == [
        "mosaic.attention",
        "mosaic.comm",
        "mosaic.comm",
    ]
