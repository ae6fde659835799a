"""A TabICL checkpoint with random weights, from the model's configuration (tests, demos, benchmarks).

The file is what tabicl's estimators load from ``model_path``
(``{"config": ..., "state_dict": ...}``, read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tabicl._model.tabicl import TabICL

from ..weights import randomize_

__all__ = ["build_random_tabicl", "make_random_checkpoint"]


def build_random_tabicl(*, seed: int = 0, **config) -> tuple[TabICL, dict]:
    """``TabICL(**config)`` (its defaults where not given) with random weights, in eval mode, and the config."""
    model = randomize_(TabICL(**config), seed).eval()
    return model, dict(config)


def make_random_checkpoint(path: str | Path, *, seed: int = 0, **config) -> Path:
    """Write a checkpoint of :func:`build_random_tabicl`'s model to ``path`` (for ``model_path=``)."""
    model, config = build_random_tabicl(seed=seed, **config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    return path
