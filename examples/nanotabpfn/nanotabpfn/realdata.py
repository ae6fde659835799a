"""A real table to evaluate on: Fisher's iris data, from scikit-learn.

R. A. Fisher (1936), measurements by E. Anderson: 150 rows, 4 features, 3
classes. ``sklearn.datasets.load_iris`` reads the copy scikit-learn ships (no
download), which follows Fisher's paper; the UCI repository's copy differs
in rows 35 and 38. Each evaluation table is the whole dataset in a random row
order; the first half are the training rows. Without scikit-learn there is
no iris: :func:`load_iris` returns ``None`` and the caller says so.
"""

from __future__ import annotations

import torch

import mosaic

from .prior import mix
from .tables import Tables

MISSING = "scikit-learn is not installed (pip install -r examples/nanotabpfn/requirements.txt)"


def load_iris() -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """Features ``(150, 4)`` float32, labels ``(150,)`` int64 and the class names; ``None`` without scikit-learn."""
    try:
        from sklearn.datasets import load_iris as sklearn_iris
    except ImportError:
        return None
    data = sklearn_iris()
    x = torch.tensor(data.data.tolist(), dtype=torch.float32)
    y = torch.tensor(data.target.tolist(), dtype=torch.int64)
    return x, y, [str(name) for name in data.target_names]


def iris_tables(ctx: mosaic.Context, repeats: int, seed: int) -> Tables | None:
    """``repeats`` shuffles of iris, half of each for training; this rank's rows of them (on the CPU).

    ``None`` when scikit-learn is not installed.
    """
    iris = load_iris()
    if iris is None:
        return None
    x, y, _ = iris
    orders = torch.stack(
        [torch.randperm(len(y), generator=torch.Generator().manual_seed(mix("iris", seed, r))) for r in range(repeats)]
    )
    return Tables.shard(x[orders], y[orders], len(y) // 2, ctx.sharded_dim(len(y), dim=1))
