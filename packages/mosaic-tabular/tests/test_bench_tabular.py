"""benchmarks/bench_tabular.py on CPU, tiny: each Mosaic case computes what the package's own computes, and
under torchrun the rows are sharded over every rank (it once ran them all at sp_size 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tabpfn", reason="needs tabpfn==9.2.* (pip install mosaic-tabular[tabpfn])")
pytest.importorskip("tabicl", reason="needs tabicl==2.2.* (pip install mosaic-tabular[tabicl])")
pytest.importorskip("mosaic_ring", reason="needs mosaic-ring for a backend over sharded rows")

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_tabular.py"
TINY = ["--device", "cpu", "--rows", "60", "--features", "5", "--tabpfn-layers", "1", "--repeats", "1"]


def _run(tmp_path: Path, *launcher: str, cases: list[str]) -> list[dict]:
    out = tmp_path / "bench.json"
    cmd = [*launcher, str(BENCH), *TINY, "--cases", *cases, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())["results"]


def test_every_mosaic_case_computes_the_packages_output(tmp_path: Path) -> None:
    pairs = [("tabpfn/own", "tabpfn/mosaic"), ("tabpfn/memory_saving", "tabpfn/mosaic_memory_saving"),
             ("tabicl/own", "tabicl/mosaic"), ("tabicl/offload", "tabicl/mosaic_offload")]  # fmt: skip
    results = {r["case"]: r for r in _run(tmp_path, sys.executable, cases=[c for pair in pairs for c in pair])}
    for own, sharded in pairs:
        assert results[sharded]["sp_size"] == 1
        assert results[sharded]["output_abs_mean"] == pytest.approx(results[own]["output_abs_mean"], rel=1e-5), own


def test_under_torchrun_the_rows_are_sharded_over_every_rank(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    results = _run(tmp_path, *launcher, cases=["tabicl/own", "tabicl/mosaic"])
    assert [(r["case"], r["sp_size"]) for r in results] == [("tabicl/mosaic", 2)]  # own paths only at P = 1
    assert results[0]["seconds"] > 0
