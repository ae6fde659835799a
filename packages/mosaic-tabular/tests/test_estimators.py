"""The estimators users call, from a checkpoint file with random weights: sharded ``predict_proba`` == the package's.

Each rank fits and predicts on the whole table (the package's preprocessing);
the model's forward is sharded. 37 training rows, 23 test rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mosaic_ring", reason="needs mosaic-ring for the ring and allgather backends")
pytest.importorskip("sklearn", reason="needs scikit-learn for the data")

import numpy as np
import torch
from helpers import assert_close
from sklearn.datasets import make_classification, make_regression

import mosaic
from mosaic.testing import run_distributed

TABPFN = dict(nlayers=2, emsize=24, nhead=2, num_thinking_rows=3)
TABICL = dict(embed_dim=16, col_num_blocks=1, col_nhead=2, col_num_inds=8, row_num_blocks=1, row_nhead=2,
              row_num_cls=2, icl_num_blocks=2, icl_nhead=2, max_classes=4)  # fmt: skip
FP32 = {k: {"use_amp": False} for k in ("COL_CONFIG", "ROW_CONFIG", "ICL_CONFIG")}


def classification():
    X, y = make_classification(n_samples=60, n_features=6, n_informative=4, n_classes=3, random_state=0)
    return X[:37], y[:37], X[37:]


def regression():
    X, y = make_regression(n_samples=60, n_features=5, random_state=0)
    return X[:37], y[:37], X[37:]


def tabpfn_classifier(world: int | None, path: str, fit_mode: str = "fit_preprocessors") -> np.ndarray:
    if world is None:
        from tabpfn import TabPFNClassifier
    else:
        mosaic.init(sp_size=world)
        from mosaic_tabular.tabpfn import TabPFNClassifier
    clf = TabPFNClassifier(model_path=path, n_estimators=2, device="cpu", inference_precision=torch.float32,
                           fit_mode=fit_mode)  # fmt: skip
    if world is not None:
        clf.set_params(backend="allgather")
    X, y, X_test = classification()
    return clf.fit(X, y).predict_proba(X_test)


def tabpfn_regressor(world: int | None, path: str, fit_mode: str = "fit_preprocessors") -> np.ndarray:
    if world is None:
        from tabpfn import TabPFNRegressor
    else:
        mosaic.init(sp_size=world)
        from mosaic_tabular.tabpfn import TabPFNRegressor
    reg = TabPFNRegressor(model_path=path, n_estimators=2, device="cpu", inference_precision=torch.float32,
                          fit_mode=fit_mode)  # fmt: skip
    X, y, X_test = regression()
    return reg.fit(X, y).predict(X_test)


def tabicl_classifier(world: int | None, path: str, kv_cache: bool | str = False) -> np.ndarray:
    if world is None:
        from tabicl import TabICLClassifier
    else:
        mosaic.init(sp_size=world)
        from mosaic_tabular.tabicl import TabICLClassifier
    clf = TabICLClassifier(model_path=path, n_estimators=2, device="cpu", allow_auto_download=False,
                           inference_config=FP32, kv_cache=kv_cache)  # fmt: skip
    if world is not None:
        clf.set_params(backend="ring")
    X, y, X_test = classification()
    return clf.fit(X, y).predict_proba(X_test)


def tabicl_regressor(world: int | None, path: str, kv_cache: bool | str = False) -> np.ndarray:
    if world is None:
        from tabicl import TabICLRegressor
    else:
        mosaic.init(sp_size=world)
        from mosaic_tabular.tabicl import TabICLRegressor
    reg = TabICLRegressor(model_path=path, n_estimators=2, device="cpu", allow_auto_download=False,
                          inference_config=FP32, kv_cache=kv_cache)  # fmt: skip
    X, y, X_test = regression()
    # TabICL predicts standardised targets and scales them back: with a spread of 1, the tolerance (1e-5 of
    # the predictions' largest value) is 1e-5 of the targets' spread.
    return reg.fit(X, y / y.std()).predict(X_test)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("checkpoints")
    out = {}
    if _have("tabpfn"):
        from mosaic_tabular.tabpfn.checkpoint import make_random_checkpoint

        out["tabpfn_classifier"] = str(make_random_checkpoint(d / "c.ckpt", **TABPFN))
        out["tabpfn_regressor"] = str(make_random_checkpoint(d / "r.ckpt", task="regressor", **TABPFN))
        out["tabpfn_v2_classifier"] = str(make_random_checkpoint(d / "c2.ckpt", "tabpfn_v2", **TABPFN))
    if _have("tabicl"):
        from mosaic_tabular.tabicl.checkpoint import make_random_checkpoint

        out["tabicl_classifier"] = str(make_random_checkpoint(d / "i.ckpt", **TABICL))
        out["tabicl_regressor"] = str(
            make_random_checkpoint(d / "ir.ckpt", **{**TABICL, "max_classes": 0, "num_quantiles": 19})
        )
    return out


def _have(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# (checkpoint, estimator, its extra arguments, the worlds it runs in)
CASES = [
    ("tabpfn_classifier", tabpfn_classifier, (), (1, 3)),
    ("tabpfn_regressor", tabpfn_regressor, (), (2,)),
    ("tabpfn_classifier", tabpfn_classifier, ("fit_with_cache",), (2, 4)),
    ("tabpfn_regressor", tabpfn_regressor, ("fit_with_cache",), (3,)),
    ("tabpfn_v2_classifier", tabpfn_classifier, (), (2,)),
    ("tabpfn_v2_classifier", tabpfn_classifier, ("fit_with_cache",), (3,)),
    ("tabicl_classifier", tabicl_classifier, (), (1, 3)),
    ("tabicl_classifier", tabicl_classifier, (True,), (2, 4)),
    ("tabicl_classifier", tabicl_classifier, ("repr",), (3,)),
    ("tabicl_regressor", tabicl_regressor, (), (2,)),
    ("tabicl_regressor", tabicl_regressor, ("kv",), (3,)),
]
IDS = [f"{name}{''.join(f'-{a}' for a in args)}" for name, _, args, _ in CASES]


@pytest.mark.parametrize(("name", "fn", "args", "worlds"), CASES, ids=IDS)
def test_sharded_estimator_predicts_as_the_packages(checkpoints: dict, name: str, fn, args, worlds) -> None:
    if name not in checkpoints:
        pytest.skip(f"needs {name.split('_')[0]} installed")
    path = checkpoints[name]
    want = run_distributed(fn, 1, None, path, *args, timeout=300)[0]
    assert Path(path).exists()
    for world in worlds:
        for rank, got in enumerate(run_distributed(fn, world, world, path, *args, timeout=300)):
            assert_close(got, want, f"{fn.__name__}{args} P={world} rank {rank}")
