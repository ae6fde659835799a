"""tabpfn 9.2's whole TabPFN v2.6, v2 and v2.5 models (random weights, fp32), rows sharded at P = 1..4 == unsharded.

The table has 23 rows, 10 of them training rows: at P = 4 rank 0 holds only
training rows and ranks 2 and 3 only test rows; 23 is not divisible by 2, 3 or 4.
Its features exercise the encoder's statistics over rows: a constant feature,
one constant over the training rows only, NaN and inf cells. At P > 1, rank 0
asks for the blocks' memory-saving chunks and the others do not (the
estimators choose it from each device's free memory): the ranks agree.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tabpfn", reason="needs tabpfn==9.2.* (pip install mosaic-tabular[tabpfn])")
pytest.importorskip("mosaic_ring", reason="needs mosaic-ring for the ring and allgather backends")

import torch
from helpers import WORLDS, assert_close, max_difference
from tabpfn.architectures.interface import PerformanceOptions

import mosaic
from mosaic.testing import run_distributed
from mosaic_tabular.rows import RowSplit
from mosaic_tabular.tabpfn.checkpoint import build_random_tabpfn
from mosaic_tabular.tabpfn.model import shard_tabpfn

ROWS, TRAIN, FEATURES, TABLES = 23, 10, 7, 2
SMALL = dict(nlayers=2, emsize=24, nhead=2, num_thinking_rows=3)
BACKENDS = ("allgather", "ring")


def table() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, TABLES, FEATURES, generator=g)
    x[:, :, 2] = 3.0
    x[3, 0, 4], x[15, 1, 5], x[0, 1, 3] = float("nan"), float("inf"), float("-inf")
    x[:, 1, 6] = 1.0
    x[20, 1, 6] = 2.0  # constant over the training rows, not over every row
    y = torch.randint(0, 3, (TRAIN, TABLES), generator=g).float()
    return x, y


def reference(architecture: str) -> torch.Tensor:
    model, _ = build_random_tabpfn(architecture, **SMALL)
    with torch.no_grad():
        return model(*table())


def sharded(world: int, architecture: str) -> dict:
    ctx = mosaic.init(sp_size=world)
    chunks = PerformanceOptions(save_peak_memory_factor=2 if ctx.sp_rank == 0 else None)
    out = {}
    for backend in BACKENDS:
        model = shard_tabpfn(build_random_tabpfn(architecture, **SMALL)[0], backend, whole_table=True)
        with torch.no_grad():
            out[backend] = model(*table(), performance_options=chunks)
    # The negative control: the package's own model on one rank's rows (some training rows, not all).
    rows = RowSplit.of(ROWS, TRAIN)
    x, y = table()
    if 0 < rows.local_train < min(rows.length, TRAIN):  # some training rows here, some elsewhere, test rows
        with torch.no_grad():
            out["local"] = build_random_tabpfn(architecture, **SMALL)[0](rows.take(x, 0), rows.take_train(y, 0))
    out["test_rows"] = (max(0, rows.offset - TRAIN), rows.length - rows.local_train)
    return out


CASES = [("tabpfn_v2_6", world) for world in WORLDS] + [("tabpfn_v2", world) for world in WORLDS]
CASES += [("tabpfn_v2_5", 3)]


@pytest.mark.parametrize(("architecture", "world"), CASES, ids=[f"{a}-P{w}" for a, w in CASES])
def test_tabpfn_with_sharded_rows_matches_unsharded(architecture: str, world: int) -> None:
    want = reference(architecture)
    results = run_distributed(sharded, world, world, architecture, timeout=300)
    for rank, got in enumerate(results):
        for backend in BACKENDS:
            assert_close(got[backend], want, f"{architecture} P={world} {backend} rank {rank}")
        if "local" in got:
            # The package's model on one rank's rows alone (local statistics, local keys) is far off.
            start, count = got["test_rows"]
            assert max_difference(got["local"], want[start : start + count]) > 1e-2


def refuse(world: int, architecture: str) -> str:
    mosaic.init(sp_size=world)
    model, _ = build_random_tabpfn(architecture, nlayers=1, num_buckets=10)
    try:
        shard_tabpfn(model, "allgather")
    except NotImplementedError as exc:
        return str(exc)
    return "sharded"


@pytest.mark.parametrize("architecture", ["tabpfn_v3", "tabpfn_v3_5"])
def test_architectures_not_covered_raise_on_every_rank_naming_them(architecture: str) -> None:
    errors = run_distributed(refuse, 2, 2, architecture, timeout=120)
    assert len(set(errors)) == 1 and "can't shard the rows of TabPFNV" in errors[0], errors
