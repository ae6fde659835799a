"""Every backend that runs on CPU, from the nanoTabPFN example's command line.

``--backend-option key=value`` (repeatable) gives a backend its options, so
``mesh2d``, ``composed`` and ``hierarchical`` run from ``train.py`` like the
others; a backend whose required option is missing stops with one line that
names it and gives an example. Each run is tiny (20 rows, 2 steps) at the
world size its backend needs, and must train like one process does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

import mosaic
from mosaic.testing import run_distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanotabpfn"
TINY_ARGS = "--rows 20 --batch-size 2 --embedding-size 16 --heads 2 --layers 1 --mlp-hidden 16 --classes 2"
# Two steps, one evaluation at the end (2 classes: no iris).
TINY = [*TINY_ARGS.split(), "--steps", "2", "--warmup", "1", "--eval-every", "0", "--eval-batches", "1"]
TINY += ["--device", "cpu"]

# The world size each backend runs at here, and the options it needs.
RUNS: dict[str, tuple[int, list[str]]] = {
    "local": (1, []),
    "auto": (2, []),
    "allgather": (2, ["chunks=2"]),
    "ring": (2, []),
    "switch": (2, []),
    "ulysses": (2, []),
    "mesh2d": (4, ["mesh_shape=2,2"]),
    "composed": (4, ["mesh_shape=2,2", "seq_parallel=allgather"]),
    "hierarchical": (4, ["intra_node_size=2", "inter_node_strategy=ring"]),
}


def _train_module():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("nanotabpfn_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_task(argv: list[str]) -> tuple[int, str]:
    """On every rank: train.py's main; its exit status (0 when it returns) and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _train_module().main(argv)
        except SystemExit as stop:
            return int(stop.code or 0), err.getvalue()
    return 0, err.getvalue()


def _cpu_backends() -> set[str]:
    names = set()
    for name in mosaic.available_backends():
        try:
            if "cpu" in mosaic.get_backend(name).capabilities.devices:
                names.add(name)
        except mosaic.BackendUnavailable:
            continue
    return names


def test_every_listed_cpu_backend_has_a_run_here() -> None:
    """A new backend that runs on CPU must be added to RUNS (and so be runnable from train.py)."""
    assert _cpu_backends() <= set(RUNS), _cpu_backends() - set(RUNS)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("one")
    assert run_distributed(train_task, 1, [*TINY, "--backend", "local", "--out-dir", str(out)], timeout=240)[0][0] == 0
    return json.loads((out / "metrics.json").read_text())["losses"]


@pytest.mark.parametrize("backend", sorted(RUNS))
def test_backend_runs_from_the_command_line(backend: str, tmp_path: Path, one_process: list[float]) -> None:
    if backend not in mosaic.available_backends():
        pytest.skip(f"{backend} is not installed")
    world, options = RUNS[backend]
    argv = [*TINY, "--backend", backend, "--out-dir", str(tmp_path)]
    argv += [arg for option in options for arg in ("--backend-option", option)]
    results = run_distributed(train_task, world, argv, timeout=240)
    assert all(code == 0 for code, _ in results), results
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sp_size"] == world and metrics["args"]["backend_option"] == options
    # Sharding changes only the rounding: the same two steps as one process.
    assert metrics["losses"] == pytest.approx(one_process, abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "sp", "message"),
    [
        (
            ["--backend", "mesh2d"],
            4,
            "--backend mesh2d needs option(s) mesh_shape: e.g. --backend-option mesh_shape=2,2",
        ),
        (
            ["--backend", "composed"],
            2,
            "--backend composed needs option(s) mesh_shape: e.g. --backend-option mesh_shape=1,2",
        ),
        (
            ["--backend", "hierarchical"],
            4,
            "--backend hierarchical needs option(s) intra_node_size: e.g. --backend-option intra_node_size=2",
        ),
        (["--backend-option", "chunks"], 1, "--backend-option: option 'chunks' is not key=value"),
        (["--backend-option", "chunk=2"], 1, "backend 'allgather' has no option 'chunk' (its options: chunks)"),
        (["--backend", "mesh2d", "--backend-option", "mesh_shape=2"], 1, "option mesh_shape must be a tuple of ints"),
    ],
)
def test_bad_backend_options_are_named(argv: list[str], sp: int, message: str) -> None:
    train = _train_module()
    if argv[1] not in mosaic.available_backends() and argv[0] == "--backend":
        pytest.skip(f"{argv[1]} is not installed")
    args = train.parse_args([*argv, "--sp-size", str(sp)])
    assert message in train.check_args(args, sp, sp > 1)


def test_a_missing_option_is_one_line_not_a_traceback(capsys) -> None:
    if "mesh2d" not in mosaic.available_backends():
        pytest.skip("mosaic-mesh2d is not installed")
    with pytest.raises(SystemExit) as stop:
        _train_module().main(["--backend", "mesh2d"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "train.py: error: --backend mesh2d needs option(s) mesh_shape: e.g. --backend-option mesh_shape=1,1\n"
    )


def test_a_mesh_that_does_not_fit_is_one_line_on_every_rank(tmp_path: Path) -> None:
    if "mesh2d" not in mosaic.available_backends():
        pytest.skip("mosaic-mesh2d is not installed")
    argv = [*TINY, "--backend", "mesh2d", "--backend-option", "mesh_shape=2,2", "--out-dir", str(tmp_path)]
    (code0, err0), (code1, err1) = run_distributed(train_task, 2, argv, timeout=120)
    assert code0 == code1 == 2 and err1 == ""
    assert err0.startswith("train.py: error: backend 'mesh2d': mesh_shape (2, 2) has 4 ranks but the sp group has 2")
    assert "Traceback" not in err0
