"""A TabPFN checkpoint with random weights, from an architecture's configuration (tests, demos, benchmarks).

These machines reach no model hub; an estimator loads whatever file
``model_path`` names. The file is what ``tabpfn.model_loading.save_tabpfn_model``
writes (``state_dict``, ``config``, ``architecture_name``; regressors also the
bar distribution's borders), so the package's own loader reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
from tabpfn.architectures import ARCHITECTURES
from tabpfn.architectures.shared.bar_distribution import FullSupportBarDistribution

from ..weights import randomize_

__all__ = ["build_random_tabpfn", "make_random_checkpoint"]

Task = Literal["classifier", "regressor"]


def build_random_tabpfn(architecture: str = "tabpfn_v2_6", task: Task = "classifier", *, seed: int = 0,
                        **config) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """The architecture (a name of ``tabpfn.architectures.ARCHITECTURES``) with random weights, and its config.

    ``config`` overrides the architecture's defaults (e.g. ``nlayers=2, emsize=48``); classifiers get
    ``max_num_classes=10``, regressors ``num_buckets=100`` unless given.
    """
    module = ARCHITECTURES[architecture]
    config.setdefault("max_num_classes", 10 if task == "classifier" else -1)
    config.setdefault("num_buckets", 100 if task == "regressor" else -1)
    parsed, _ = module.parse_config(config)
    model = randomize_(module.get_architecture(parsed), seed).eval()
    return model, dataclasses.asdict(parsed)


def make_random_checkpoint(path: str | Path, architecture: str = "tabpfn_v2_6", task: Task = "classifier", *,
                           seed: int = 0, **config) -> Path:  # fmt: skip
    """Write a checkpoint of :func:`build_random_tabpfn`'s model to ``path`` (for ``model_path=``)."""
    model, parsed = build_random_tabpfn(architecture, task, seed=seed, **config)
    state = model.state_dict()
    if task == "regressor":
        borders = torch.linspace(-4.0, 4.0, parsed["num_buckets"] + 1)
        state.update({f"criterion.{k}": v for k, v in FullSupportBarDistribution(borders).state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "config": parsed, "architecture_name": architecture}, path)
    return path
