"""Save and resume training: weights, optimizer state, step and loss history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .model import NanoTabPFN


def save_checkpoint(
    path: Path,
    model: NanoTabPFN,
    optimizer: torch.optim.Optimizer,
    step: int,
    losses: list[float],
    model_config: dict[str, Any],
) -> None:
    """Write atomically (a temporary file renamed), so an interrupted save leaves the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "losses": losses,
        "model_config": model_config,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    model: NanoTabPFN,
    optimizer: torch.optim.Optimizer,
    model_config: dict[str, Any],
    device: torch.device,
) -> tuple[int, list[float]]:
    """Restore ``model`` and ``optimizer``; returns the steps done and their losses."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=device, weights_only=True)
    saved = state["model_config"]
    if saved != model_config:
        diff = {k: (saved.get(k), model_config.get(k)) for k in saved.keys() | model_config.keys()}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ValueError(f"checkpoint {path} is of another model (saved, requested): {diff}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["losses"])
