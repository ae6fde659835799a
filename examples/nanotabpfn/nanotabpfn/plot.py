"""The loss curve as a standalone SVG (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[low, high]``."""
    span = high - low or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def loss_curve_svg(losses: list[float], title: str, *, first_step: int = 1) -> str:
    """SVG text: every step's loss (light) and its moving average (dark) against the step."""
    if not losses:
        raise ValueError("no losses to plot")
    window = max(1, len(losses) // 20)
    smooth = moving_average(losses, window)
    x0, x1 = first_step, first_step + max(len(losses) - 1, 1)
    y0, y1 = min(losses), max(losses)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    px = lambda s: LEFT + (s - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)
    py = lambda v: TOP + (y1 - v) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)
    line = lambda vs: " ".join(f"{px(first_step + i):.1f},{py(v):.1f}" for i, v in enumerate(vs))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
    ]
    for v in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for s in _ticks(x0, x1):
        parts.append(f'<text x="{px(s):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{s:g}</text>')
    parts += [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="none" stroke="#444"/>',
        f'<polyline fill="none" stroke="#9ecae1" stroke-width="1" points="{line(losses)}"/>',
        f'<polyline fill="none" stroke="#08519c" stroke-width="2" points="{line(smooth)}"/>',
        f'<line x1="{WIDTH - RIGHT - 210}" x2="{WIDTH - RIGHT - 190}" y1="{TOP + 16}" y2="{TOP + 16}" '
        'stroke="#9ecae1"/>',
        f'<text x="{WIDTH - RIGHT - 184}" y="{TOP + 20}">every step</text>',
        f'<line x1="{WIDTH - RIGHT - 110}" x2="{WIDTH - RIGHT - 90}" y1="{TOP + 16}" y2="{TOP + 16}" '
        'stroke="#08519c" stroke-width="2"/>',
        f'<text x="{WIDTH - RIGHT - 84}" y="{TOP + 20}">mean of {window}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">step</text>',
        f'<text x="18" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 18 {HEIGHT / 2})">'
        "cross-entropy on test rows</text>",
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def write_loss_curve(path: Path, losses: list[float], title: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(loss_curve_svg(losses, title))
