"""tabicl 2.2's K/V caches (random weights, fp32): a cache built on sharded training rows predicts as the package's.

Both cache modes (``"kv"``: the ICL transformer's keys/values; ``"repr"``: the
row representations) at P = 1..4 with ``allgather`` and ``ring``: the cache is
built from the training rows, split over the ranks, and the test rows, split
apart, are predicted from it (and in one pass with the build). 10 training
rows and 13 test rows (not divisible by 2, 3, 4); at P = 4 also 3 training rows
and 2 test rows, so that ranks hold no training row or no test row.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tabicl", reason="needs tabicl==2.2.* (pip install mosaic-tabular[tabicl])")
pytest.importorskip("mosaic_ring", reason="needs mosaic-ring for the ring and allgather backends")

import torch
from helpers import WORLDS, assert_close, max_difference
from tabicl._model.inference_config import InferenceConfig

import mosaic
from mosaic.testing import run_distributed
from mosaic_tabular.rows import RowSplit
from mosaic_tabular.tabicl.checkpoint import build_random_tabicl
from mosaic_tabular.tabicl.model import shard_tabicl

FEATURES, TABLES = 5, 2
SMALL = dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=1, row_nhead=2,
             row_num_cls=2, icl_num_blocks=2, icl_nhead=2, max_classes=4)  # fmt: skip
BACKENDS = ("allgather", "ring")
MODES = ("kv", "repr")


def fp32() -> InferenceConfig:
    return InferenceConfig(**{k: {"use_amp": False} for k in ("COL_CONFIG", "ROW_CONFIG", "ICL_CONFIG")})


def table(train: int, test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TABLES, train + test, FEATURES, generator=g)
    y = torch.randint(0, 3, (TABLES, train), generator=g).float()
    y[:, :3] = torch.tensor([0.0, 2.0, 1.0])  # every class in every table
    return x[:, :train], y, x[:, train:]


def predictions(model, x_train, y_train, x_test, mode: str) -> dict[str, torch.Tensor]:
    """The cache built, then the test rows predicted from it; and the build that predicts in the same pass."""
    with torch.no_grad():
        model.forward_with_cache(x_train, y_train, store_cache=True, cache_mode=mode, inference_config=fp32())
        cached = model.forward_with_cache(X_test=x_test, use_cache=True, store_cache=False, inference_config=fp32())
        model.clear_cache()
        one_pass = model.forward_with_cache(x_train, y_train, x_test, store_cache=True, cache_mode=mode,
                                            inference_config=fp32())  # fmt: skip
    return {"cached": cached, "one_pass": one_pass}


def reference(train: int, test: int) -> dict[str, dict[str, torch.Tensor]]:
    return {mode: predictions(build_random_tabicl(**SMALL)[0], *table(train, test), mode) for mode in MODES}


def sharded(world: int, train: int, test: int) -> dict:
    mosaic.init(sp_size=world)
    out = {}
    for backend in BACKENDS:
        model = shard_tabicl(build_random_tabicl(**SMALL)[0], backend, whole_table=True)
        out[backend] = {mode: predictions(model, *table(train, test), mode) for mode in MODES}
    # The negative control: the package's model with a cache of this rank's training rows alone.
    x_train, y_train, x_test = table(train, test)
    mine, tests = RowSplit.of(train, train), RowSplit.of(test, 0)
    if 3 <= mine.length < train and tests.length:
        local = predictions(build_random_tabicl(**SMALL)[0], mine.take(x_train, 1), mine.take(y_train, 1),
                            tests.take(x_test, 1), "kv")  # fmt: skip
        out["local"] = (local["cached"], tests.offset, tests.length)
    return out


CASES = [(world, 10, 13) for world in WORLDS] + [(4, 3, 2)]


@pytest.mark.parametrize(("world", "train", "test"), CASES, ids=[f"P{w}-{a}train-{b}test" for w, a, b in CASES])
def test_tabicl_cache_on_sharded_rows_predicts_as_unsharded(world: int, train: int, test: int) -> None:
    want = reference(train, test)
    for rank, got in enumerate(run_distributed(sharded, world, world, train, test, timeout=300)):
        for backend in BACKENDS:
            for mode in MODES:
                for path in ("cached", "one_pass"):
                    assert_close(got[backend][mode][path], want[mode][path], f"P={world} {backend} {mode} {path} "
                                 f"rank {rank}")  # fmt: skip
        if "local" in got:
            local, start, count = got["local"]
            mine = want["kv"]["cached"][:, start : start + count]
            assert local.shape != mine.shape or max_difference(local, mine) > 1e-2
