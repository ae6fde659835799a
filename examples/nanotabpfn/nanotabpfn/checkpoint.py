"""Save and resume training through ``torch.distributed.checkpoint`` (``mosaic.training``).

A checkpoint is a directory: the weights and AdamW state (each tensor
written once, since every rank holds the same copy), the steps' losses, the
evaluations so far and the model's configuration. Every rank calls both
functions. It loads at any ``--sp-size`` and world size, one process included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mosaic.training import checkpoint_extra
from mosaic.training import load_checkpoint as load_state
from mosaic.training import save_checkpoint as save_state

from .model import NanoTabPFN


def save_checkpoint(
    path: Path,
    model: NanoTabPFN,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    evaluations: list[dict[str, Any]],
    model_config: dict[str, Any],
) -> None:
    """Write ``path`` (replacing it only once the new one is complete); the step is ``len(losses)``."""
    extra = {"step": len(losses), "losses": losses, "evaluations": evaluations, "model_config": model_config}
    save_state(path, model, optimizer, extra=extra)


def load_checkpoint(
    path: Path, model: NanoTabPFN, optimizer: torch.optim.Optimizer, model_config: dict[str, Any]
) -> tuple[int, list[float], list[dict[str, Any]]]:
    """Restore ``model`` and ``optimizer``; returns the steps done, their losses and the evaluations."""
    saved = checkpoint_extra(path)["model_config"]
    if saved != model_config:
        diff = {k: (saved.get(k), model_config.get(k)) for k in saved.keys() | model_config.keys()}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ValueError(f"checkpoint {path} is of another model (saved, requested): {diff}")
    extra = load_state(path, model, optimizer)
    return int(extra["step"]), list(extra["losses"]), list(extra["evaluations"])
