"""A real table to evaluate on: Fisher's iris data, shipped as ``iris.csv``.

R. A. Fisher (1936), measurements by E. Anderson; this is the UCI Machine
Learning Repository's copy (CC BY 4.0), which differs from the paper in rows
35 and 38. 150 rows, 4 features, 3 classes. Each evaluation table is the
whole dataset in a random row order; the first half are the training rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

import mosaic

from .prior import mix
from .tables import RowShard, Tables

IRIS_CSV = Path(__file__).with_name("iris.csv")


def load_iris() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features ``(150, 4)`` float32, labels ``(150,)`` int64, and the class names."""
    with IRIS_CSV.open(newline="") as f:
        records = list(csv.DictReader(f))
    names = sorted({r["species"] for r in records})
    x = torch.tensor([[float(v) for k, v in r.items() if k != "species"] for r in records])
    y = torch.tensor([names.index(r["species"]) for r in records])
    return x, y, names


def iris_tables(ctx: mosaic.Context, repeats: int, seed: int) -> Tables:
    """``repeats`` shuffles of iris, half of each for training; this rank's rows of them (on the CPU)."""
    x, y, _ = load_iris()
    orders = torch.stack(
        [torch.randperm(len(y), generator=torch.Generator().manual_seed(mix("iris", seed, r))) for r in range(repeats)]
    )
    return Tables.shard(x[orders], y[orders], len(y) // 2, RowShard.of(ctx, len(y)))
