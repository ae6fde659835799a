"""Sessions for the Mosaic monorepo (run ``nox -l`` for the list).

Every package under ``packages/`` is found automatically; ``package`` is
parametrized over them and installs one package with mosaic-core alone, so
each team can depend on just what it uses; ``root`` installs the repository
root with every extra, as the README's install section does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
# Pinned: an unpinned torch would move with every release. From the package index this is the CUDA build on
# Linux (several GB with its NVIDIA libraries); MOSAIC_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU-only build (about 200 MB) from PyTorch's own index instead.
TORCH = os.environ.get("MOSAIC_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("MOSAIC_TORCH_INDEX")
# The docs tools, at the versions the site was last built with (nox -s docs).
DOCS = [
    "mkdocs==1.6.1",
    "mkdocstrings==1.0.8",
    "mkdocstrings-python==2.0.11",
    "griffelib==2.4.1",
    "mkdocs-autorefs==1.4.5",
    "markdown==3.11.3",
    "ruff==0.17.6",  # formats the signatures
]

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "package", "docs"]
# A session's second run reuses its virtual environment; pip then finds torch and the rest installed.
nox.options.reuse_venv = "yes"


@dataclass(frozen=True)
class Package:
    name: str
    path: Path

    @property
    def tests(self) -> Path:
        return self.path / "tests"


def list_packages() -> list[Package]:
    return [Package(p.name, p) for p in sorted((ROOT / "packages").iterdir()) if (p / "pyproject.toml").exists()]


PACKAGES = list_packages()
CORE = next(p for p in PACKAGES if p.name == "mosaic-core")


def local_dependencies(pkg: Package) -> list[Package]:
    """The packages of this repo that ``pkg`` declares as dependencies (recursively), in install order."""
    declared = tomllib.loads((pkg.path / "pyproject.toml").read_text())["project"].get("dependencies", [])
    names = {re.split(r"[ <>=!\[;]", d, maxsplit=1)[0].strip() for d in declared}
    out: list[Package] = []
    for dep in PACKAGES:
        if dep.name in names and dep is not pkg:
            out += [p for p in (*local_dependencies(dep), dep) if p not in out]
    return out


def _install_torch(session: nox.Session) -> None:
    """torch first, with pip's progress on screen: the first install is the long one of every session."""
    where = f"from {TORCH_INDEX}" if TORCH_INDEX else "from the package index"
    session.log(
        f"installing {TORCH} {where}; a virtual environment that has it already installs nothing"
        + ("" if TORCH_INDEX else " (MOSAIC_TORCH_INDEX=https://download.pytorch.org/whl/cpu: the CPU-only build)")
    )
    session.install(TORCH, *(["--index-url", TORCH_INDEX] if TORCH_INDEX else []), silent=False)


def _install(session: nox.Session, *packages: Package) -> None:
    _install_torch(session)
    ordered: list[Package] = []
    for pkg in packages:
        ordered += [p for p in (*local_dependencies(pkg), pkg) if p not in ordered]
    # One pip call with every local path, so no dependency is looked up on the index.
    session.install(*[arg for p in ordered for arg in ("-e", str(p.path))])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Every package installed together; all package tests and the top-level tests."""
    _install(session, *PACKAGES)
    # ring-flash-attn is pure Python: with it, the ring_flash_attn engine's ring runs on CPU against an
    # emulated flash kernel (flash-attn itself needs CUDA).
    session.install("pytest")
    session.install("--no-deps", "ring-flash-attn==0.1.8")
    # The top-level tests run the example's train.py (tqdm, matplotlib, scikit-learn), and checkpoints of
    # several processes need numpy: the example's requirements name all of them.
    session.install("-r", "examples/nanotabpfn/requirements.txt")
    # tests/integrations shards real models imported from their packages; TORCH again in the same
    # resolve, so that neither package moves torch off the CPU build.
    session.install(TORCH, "tabpfn==9.2.0", "tabicl==2.2.0")
    paths = [str(p.tests) for p in PACKAGES if p.tests.exists()] + ["tests"]
    session.run("pytest", *paths, *session.posargs)


_PACKAGE_NAMES = [p.name for p in PACKAGES]


@nox.session
@nox.parametrize("package", _PACKAGE_NAMES, ids=_PACKAGE_NAMES)
def package(session: nox.Session, package: str) -> None:
    """One package with only mosaic-core (and what it declares): import smoke test and its tests."""
    pkg = next(p for p in PACKAGES if p.name == package)
    _install(session, pkg)
    session.install("pytest")
    module = "mosaic" if pkg is CORE else pkg.name.replace("-", "_")
    session.run("python", "-c", f"import {module}, mosaic; print(mosaic.available_backends())")
    if pkg.tests.exists():
        session.run("pytest", str(pkg.tests), *session.posargs)


def _entry_points(pkg: Package) -> list[str]:
    project = tomllib.loads((pkg.path / "pyproject.toml").read_text())["project"]
    return list(project.get("entry-points", {}).get("mosaic.backends", {}))


@nox.session
def root(session: nox.Session) -> None:
    """``pip install -e ".[all]"`` at the repository root: every package's backends are found."""
    _install_torch(session)
    session.install("-e", ".[all]")
    want = sorted({name for p in PACKAGES for name in _entry_points(p)})
    check = f"import mosaic; got = sorted(set(mosaic.available_backends())); assert got == {want!r}, got; print(got)"
    session.run("python", "-c", check)


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU")])


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests (current Python environment): kernels on CUDA (FlashAttention-4's where flash-attn-4 is
    installed), ``local`` on each kernel against cuDNN's error, every strategy under torchrun on 2 and 4 GPUs
    (NCCL), or 2 and 4 ranks sharing one GPU where there is one."""
    count = _gpu_count()
    if count < 1:
        session.skip("needs an NVIDIA GPU, found none")
    for p in PACKAGES:
        session.run("python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(p.path))
    kernel_tests = [str(CORE.tests / name) for name in ("test_kernels.py", "test_tiny.py", "test_fa4_kernel.py")]
    session.run("python", "-m", "pytest", "-q", *kernel_tests, "-k", "cuda or tiny or fa4")
    session.run("torchrun", "--nproc_per_node=1", "tests/gpu/check_magi.py", "--kernel", "fa4", *session.posargs)
    for world in (2, 4):
        one_gpu = ["--one-gpu"] if world > count else []
        session.run("torchrun", f"--nproc_per_node={world}", "tests/gpu/check_backends.py", *one_gpu,
                    "--baseline-kernel", "cudnn", *session.posargs)  # fmt: skip


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """The kernel benchmark and the sequence-parallel benchmark on every GPU, Mosaic's kernels beside cuDNN."""
    count = _gpu_count()
    if count < 1:
        session.skip("needs an NVIDIA GPU, found none")
    session.run("python", "benchmarks/bench_kernels.py", "--packed")
    session.run("torchrun", f"--nproc_per_node={count}", "benchmarks/bench_sp.py", "--kernels", "auto", "cudnn",
                *session.posargs)  # fmt: skip


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site with its API reference into site/ (mkdocs --strict: any warning fails).

    mkdocstrings reads the docstrings from the sources, so neither torch nor the packages are installed.
    """
    session.install(*DOCS)
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: nanoTabPFN trained with its rows sharded over 4 CPU processes (gloo)."""
    _install(session, *PACKAGES)
    session.install("-r", "examples/nanotabpfn/requirements.txt")
    session.run("torchrun", "--nproc_per_node=4", "examples/nanotabpfn/train.py", *session.posargs)
