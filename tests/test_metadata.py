"""Names and metadata: one version, the MIT license everywhere, a changelog, the umbrella's name.

Every package of the repository is released at mosaic-core's version; the
installed distributions and ``mosaic.__version__`` must say the same, and
every package's metadata must carry the license its folder ships.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import mosaic

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "packages" / "mosaic-core" / "pyproject.toml"
PYPROJECTS = [ROOT / "pyproject.toml", *sorted((ROOT / "packages").glob("*/pyproject.toml"))]
COPYRIGHT = "Copyright (c) 2026 The Mosaic authors"


def project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def core_version() -> str:
    return project(CORE)["version"]


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_every_pyproject_has_mosaic_cores_version() -> None:
    versions = {path.parent.name: project(path)["version"] for path in PYPROJECTS}
    assert set(versions.values()) == {core_version()}, versions


def test_version_is_the_installed_distributions() -> None:
    assert mosaic.__version__ == core_version() == importlib.metadata.version("mosaic-core")
    for path in PYPROJECTS[1:]:
        name = project(path)["name"]
        if installed(name):
            assert importlib.metadata.version(name) == core_version(), name


def test_the_license_is_mit_in_the_repository_and_every_package() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and COPYRIGHT in text
    for path in PYPROJECTS:
        meta = project(path)
        assert meta.get("license") == "MIT", path
        assert meta.get("license-files") == ["LICENSE"], path
        # Each package builds from its own folder, so it ships its own copy.
        assert (path.parent / "LICENSE").read_text() == text, path.parent


def test_installed_metadata_carries_the_license() -> None:
    names = [project(path)["name"] for path in PYPROJECTS[1:]]
    checked = [name for name in names if installed(name)]
    assert "mosaic-core" in checked
    for name in checked:
        meta = importlib.metadata.metadata(name)
        assert meta.get("License-Expression") == "MIT", name
        assert "LICENSE" in (meta.get_all("License-File") or []), name


def test_changelog_has_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(core_version())}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M), core_version()


def test_the_umbrella_is_named_as_the_readme_says() -> None:
    name = project(ROOT / "pyproject.toml")["name"]
    # mosaic-attention is another project on the package index.
    assert name != "mosaic-attention"
    assert f"`{name}`" in (ROOT / "README.md").read_text()


def test_numpy_comes_with_the_training_extra() -> None:
    """DCP needs numpy with several processes: mosaic-core[training], the root's extras and the example have it."""
    extras = project(CORE)["optional-dependencies"]
    assert any(req.startswith("numpy") for req in extras["training"]), extras
    root = project(ROOT / "pyproject.toml")["optional-dependencies"]
    for extra in ("training", "all"):
        assert any(req.startswith("mosaic-core[training] @") for req in root[extra]), extra
    requirements = (ROOT / "examples" / "nanotabpfn" / "requirements.txt").read_text()
    assert re.search(r"^numpy", requirements, re.M)
