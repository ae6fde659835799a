"""tabpfn 9.2's K/V cache (random weights, fp32): a cache built on sharded training rows predicts as the package's.

TabPFN v2.6, v2.5 and v2 at P = 1..4 with ``allgather`` and ``ring`` (v2.5 at
P = 3): the cache is built from the training rows (``return_kv_cache=True``), split
over the ranks, with the encoder statistics of every rank's rows; the test rows,
split apart, are predicted from it (``x_is_test_only=True``, as the estimators'
``fit_mode="fit_with_cache"`` does, and from the whole table). 10 training rows
and 13 test rows with a constant feature, NaN and inf cells; at P = 4 also 3
training rows and 2 test rows, so that ranks hold no training row or no test row.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tabpfn", reason="needs tabpfn==9.2.* (pip install mosaic-tabular[tabpfn])")
pytest.importorskip("mosaic_ring", reason="needs mosaic-ring for the ring and allgather backends")

import torch
from helpers import WORLDS, assert_close, max_difference

import mosaic
from mosaic.testing import run_distributed
from mosaic_tabular.rows import RowSplit
from mosaic_tabular.tabpfn.checkpoint import build_random_tabpfn
from mosaic_tabular.tabpfn.model import shard_tabpfn

FEATURES, TABLES = 7, 2
SMALL = dict(nlayers=2, emsize=24, nhead=2, num_thinking_rows=3)
BACKENDS = ("allgather", "ring")


def table(train: int, test: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(train + test, TABLES, FEATURES, generator=g)
    x[:, :, 2] = 3.0
    x[1, 0, 4], x[-1, 1, 5], x[0, 1, 3] = float("nan"), float("inf"), float("-inf")
    return x, torch.randint(0, 3, (train, TABLES), generator=g).float()


def predictions(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cache built from the training rows, then the test rows predicted from it, alone and with the table."""
    train = y.shape[0]
    with torch.no_grad():
        _, cache = model(x[:train], y, return_kv_cache=True)
        return {"test_only": model(x[train:], y, kv_cache=cache, x_is_test_only=True),
                "whole_table": model(x, y, kv_cache=cache)}  # fmt: skip


def reference(architecture: str, train: int, test: int) -> dict[str, torch.Tensor]:
    return predictions(build_random_tabpfn(architecture, **SMALL)[0], *table(train, test))


def sharded(world: int, architecture: str, train: int, test: int) -> dict:
    mosaic.init(sp_size=world)
    out = {}
    for backend in BACKENDS:
        model = shard_tabpfn(build_random_tabpfn(architecture, **SMALL)[0], backend, whole_table=True)
        out[backend] = predictions(model, *table(train, test))
    # The negative control: the package's model with a cache of this rank's training rows alone.
    x, y = table(train, test)
    mine, tests = RowSplit.of(train, train), RowSplit.of(test, 0)
    if 0 < mine.length < train and tests.length:
        x_local = torch.cat([mine.take(x[:train], 0), tests.take(x[train:], 0)])
        local = predictions(build_random_tabpfn(architecture, **SMALL)[0], x_local, mine.take(y, 0))
        out["local"] = (local["test_only"], tests.offset, tests.length)
    return out


CASES = [(arch, world, 10, 13) for arch in ("tabpfn_v2_6", "tabpfn_v2") for world in WORLDS]
CASES += [("tabpfn_v2_5", 3, 10, 13), ("tabpfn_v2_6", 4, 3, 2), ("tabpfn_v2", 4, 3, 2)]


@pytest.mark.parametrize(("architecture", "world", "train", "test"), CASES,
                         ids=[f"{a}-P{w}-{n}train-{m}test" for a, w, n, m in CASES])  # fmt: skip
def test_tabpfn_cache_on_sharded_rows_predicts_as_unsharded(architecture: str, world: int, train: int,
                                                            test: int) -> None:  # fmt: skip
    want = reference(architecture, train, test)
    for rank, got in enumerate(run_distributed(sharded, world, world, architecture, train, test, timeout=300)):
        for backend in BACKENDS:
            for path in ("test_only", "whole_table"):
                assert_close(got[backend][path], want[path], f"{architecture} P={world} {backend} {path} rank {rank}")
        if "local" in got:
            local, start, count = got["local"]
            assert max_difference(local, want["test_only"][start : start + count]) > 1e-2
