"""The row split and the statistics over every rank's rows (mosaic-core only), and the estimators' parameter."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import assert_close

import mosaic
from mosaic.testing import run_distributed
from mosaic_tabular.estimators import with_backend_parameter
from mosaic_tabular.rows import RowSplit, constant_along_rows, finite_mean, raise_if_any
from mosaic_tabular.upstream import EXPECTED, UpstreamChanged, check_upstream, signature_changes

ROWS, TRAIN = 11, 4


def table(rows: int = ROWS) -> torch.Tensor:
    x = torch.randn(ROWS, 3, 5, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0] = 2.5  # constant
    x[7, 1, 1] = float("nan")  # NaN in a test row: not constant, not in the train mean
    x[:, 2, 2] = float("nan")  # NaN everywhere: not constant, mean 0
    x[1, 0, 3] = float("inf")  # inf in a train row: left out of the mean
    x[:, 1, 4] = 1.0
    x[9, 1, 4] = -1.0  # constant on the first ranks' rows only
    return x[:rows]


def statistics(world: int, rows: int) -> dict:
    mosaic.init(sp_size=world)
    split = RowSplit.of(rows, min(TRAIN, rows))
    x = split.take(table(rows), 0)
    return {"constant": constant_along_rows(x), "mean": finite_mean(x, split.local_train),
            "split": (split.offset, split.length, split.local_train)}  # fmt: skip


# 2 rows over 3 ranks: the last holds none, and still joins every reduction.
@pytest.mark.parametrize(("world", "rows"), [(1, ROWS), (3, ROWS), (3, 2)])
def test_statistics_over_every_ranks_rows(world: int, rows: int) -> None:
    x = table(rows)
    want_constant = (x[1:] == x[0]).all(0)
    train = x[:TRAIN]
    finite = train.isfinite()
    want_mean = torch.where(finite, train, 0).sum(0) / finite.sum(0).clamp(min=1)
    results = run_distributed(statistics, world, world, rows, timeout=120)
    for rank, got in enumerate(results):
        assert torch.equal(got["constant"], want_constant), f"P={world} rank {rank}"
        assert_close(got["mean"], want_mean, f"P={world} rank {rank} mean")
    assert [r["split"][1] for r in results] == [len(part) for part in torch.tensor_split(x, world)]


def raise_on_one_rank(world: int) -> str:
    mosaic.init(sp_size=world)
    try:
        raise_if_any(mosaic.get_context().sp_rank == world - 1, ValueError("bad rows on some rank"))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_check_of_one_ranks_rows_raises_on_every_rank() -> None:
    assert run_distributed(raise_on_one_rank, 3, 3, timeout=60) == ["bad rows on some rank"] * 3


def test_row_split_of_the_training_rows() -> None:
    # Three ranks over 11 rows, 4 of them training rows: (0..4) (4..8) (8..11).
    splits = [RowSplit(ROWS, TRAIN, offset, length) for offset, length in ((0, 4), (4, 4), (8, 3))]
    assert [s.local_train for s in splits] == [4, 0, 0]
    y = torch.arange(TRAIN)
    assert [s.take_train(y, 0).tolist() for s in splits] == [[0, 1, 2, 3], [], []]
    with pytest.raises(ValueError, match="training rows"):
        RowSplit.of(3, 4)


class StandIn:
    """A stand-in for a package estimator: parameters in the signature, as scikit-learn reads them."""

    def __init__(self, model_path: str = "auto", *, n_estimators: int = 8):
        self.model_path, self.n_estimators = model_path, n_estimators


def test_the_estimators_get_a_backend_parameter() -> None:
    @with_backend_parameter
    class Sharded(StandIn):
        pass

    assert list(inspect.signature(Sharded.__init__).parameters) == ["self", "model_path", "n_estimators", "backend"]
    est = Sharded("m.ckpt", n_estimators=2, backend="ring")
    assert (est.model_path, est.n_estimators, est.backend) == ("m.ckpt", 2, "ring")
    assert Sharded().backend == "auto"


def test_an_upstream_change_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signature that moved, or a name that is gone, fails naming it (stand-ins for tabpfn's functions)."""
    monkeypatch.setitem(EXPECTED, "standin", {
        "mosaic_tabular.rows:finite_mean": ["x", "num_train_rows"],
        "mosaic_tabular.rows:gone": ["x"],
        "mosaic_tabular.rows:RowSplit.take": ["self", "x", "dim"],
    })  # fmt: skip
    changes = signature_changes("standin")
    assert len(changes) == 2
    assert "mosaic_tabular.rows:finite_mean takes (x, n_train)" in changes[0]
    assert "mosaic_tabular.rows:gone is gone" in changes[1]
    monkeypatch.setitem(EXPECTED, "mosaic_tabular", EXPECTED["standin"])
    with pytest.raises(UpstreamChanged, match="finite_mean"):
        check_upstream("mosaic_tabular")
