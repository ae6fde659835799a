"""The run's figures as PNGs (matplotlib): the loss curve, and accuracy over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Figure objects, not pyplot: no global state and no display backend to pick on a training node.
from matplotlib.figure import Figure


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_loss_curve(path: Path, losses: Sequence[float], title: str) -> None:
    """Every step's loss (light) and its moving average (dark) against the step."""
    if not losses:
        raise ValueError("no losses to plot")
    window = max(1, len(losses) // 20)
    steps = range(1, len(losses) + 1)
    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="every step")
    ax.plot(steps, moving_average(losses, window), color="#08519c", linewidth=2, label=f"mean of {window}")
    ax.set(title=title, xlabel="step", ylabel="cross-entropy on test rows")
    ax.grid(color="#e5e5e5")
    ax.legend()
    _save(fig, path)


def write_accuracy_curve(path: Path, evaluations: Sequence[dict[str, Any]], title: str) -> None:
    """Held-out synthetic and iris accuracy at each evaluation (solid), and their majority-class baselines (dashed).

    Each evaluation is ``{"step": s, "synthetic": [accuracy, baseline], "iris": [accuracy, baseline] or None}``.
    """
    if not evaluations:
        raise ValueError("no evaluations to plot")
    steps = [e["step"] for e in evaluations]
    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.subplots()
    for key, label, color in (("synthetic", "held-out synthetic", "#08519c"), ("iris", "iris", "#d94801")):
        points = [(s, e[key]) for s, e in zip(steps, evaluations, strict=True) if e.get(key) is not None]
        if not points:
            continue
        xs, values = zip(*points, strict=True)
        ax.plot(xs, [v[0] for v in values], color=color, marker="o", markersize=3, label=label)
        ax.plot(xs, [v[1] for v in values], color=color, linestyle="--", linewidth=1, label=f"{label}: majority class")
    ax.set(title=title, xlabel="step", ylabel="accuracy on test rows", ylim=(0, 1))
    ax.grid(color="#e5e5e5")
    ax.legend(loc="lower right")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
