"""tabicl 2.2's whole TabICL model (inference, random weights, fp32), rows sharded at P = 1..4 == unsharded.

23 rows, 10 of them training rows (at P = 4 rank 0 holds only training rows,
ranks 2 and 3 only test rows). The column embedder's inducing points, target-aware
embedding and skip decision (its class-token columns hold ``-100`` everywhere),
the row interaction and the ICL transformer (QASSMax, TabICL's default) all run;
the classifier's logits, and the regressor's quantiles and ``predict_stats``.
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

ROWS, TRAIN, FEATURES, TABLES = 23, 10, 5, 2
SMALL = dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=1, row_nhead=2,
             row_num_cls=2, icl_num_blocks=2, icl_nhead=2, max_classes=4)  # fmt: skip
REGRESSOR = {**SMALL, "max_classes": 0, "num_quantiles": 19}
STATS = ["mean", "variance", "median", "quantiles"]
BACKENDS = ("allgather", "ring")


def fp32() -> InferenceConfig:
    """TabICL's inference without automatic mixed precision (its default uses it)."""
    return InferenceConfig(**{k: {"use_amp": False} for k in ("COL_CONFIG", "ROW_CONFIG", "ICL_CONFIG")})


def table() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TABLES, ROWS, FEATURES, generator=g)
    y = torch.randint(0, 3, (TABLES, TRAIN), generator=g).float()
    y[:, :3] = torch.tensor([0.0, 1.0, 2.0])  # every class in every table
    return x, y


def regression_table() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = table()
    return x, y + 0.1 * x[:, :TRAIN, 0]  # targets with a spread


def outputs(classifier, regressor) -> dict:
    with torch.no_grad():
        return {
            "logits": classifier(*table(), inference_config=fp32()),
            "quantiles": regressor(*regression_table(), inference_config=fp32()),
            "stats": regressor.predict_stats(*regression_table(), output_type=STATS, inference_config=fp32()),
        }


def reference() -> dict:
    return outputs(build_random_tabicl(**SMALL)[0], build_random_tabicl(**REGRESSOR)[0])


def sharded(world: int) -> dict:
    mosaic.init(sp_size=world)
    out = {}
    for backend in BACKENDS:
        out[backend] = outputs(*(shard_tabicl(build_random_tabicl(**config)[0], backend, whole_table=True)
                                 for config in (SMALL, REGRESSOR)))  # fmt: skip
    # The package's own model on one rank's rows (training and test rows, not every training row), the negative control.
    rows = RowSplit.of(ROWS, TRAIN)
    x, y = table()
    if 0 < rows.local_train < min(rows.length, TRAIN):  # some training rows here, some elsewhere, test rows
        with torch.no_grad():
            model = build_random_tabicl(**SMALL)[0]
            out["local"] = model(rows.take(x, 1), rows.take_train(y, 1), inference_config=fp32())
    out["test_rows"] = (max(0, rows.offset - TRAIN), rows.length - rows.local_train)
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_tabicl_with_sharded_rows_matches_unsharded(world: int) -> None:
    want = reference()
    for rank, got in enumerate(run_distributed(sharded, world, world, timeout=300)):
        for backend in BACKENDS:
            for name in ("logits", "quantiles"):
                assert_close(got[backend][name], want[name], f"P={world} {backend} {name} rank {rank}")
            for stat in STATS:
                what = f"P={world} {backend} {stat} rank {rank}"
                assert_close(got[backend]["stats"][stat], want["stats"][stat], what)
        if "local" in got:
            start, count = got["test_rows"]
            mine = want["logits"][:, start : start + count]
            # Its own rows' labels may miss a class (fewer outputs), or give other values.
            assert got["local"].shape != mine.shape or max_difference(got["local"], mine) > 1e-2


def refuse_training(world: int) -> str:
    mosaic.init(sp_size=world)
    model = shard_tabicl(build_random_tabicl(**SMALL)[0].train(), "allgather")
    try:
        model(*table())
    except NotImplementedError as exc:
        return str(exc)
    return "ran"


def test_training_mode_raises_on_every_rank() -> None:
    errors = run_distributed(refuse_training, 2, 2, timeout=120)
    assert len(set(errors)) == 1 and "inference only" in errors[0], errors
