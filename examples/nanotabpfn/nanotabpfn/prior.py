"""The synthetic prior: classification tables drawn on the fly from random functions.

Each table is ``y = class(f(x))``: Gaussian features (correlated, then each
shifted and scaled), ``f`` a random MLP (random depth, activation, irrelevant
features, noise inside), its output cut into classes at quantiles. Class ids
are shuffled so their order says nothing.

Determinism that does not depend on the sharding: everything about a step's
batch (seeds, feature count, split point) comes from integers every rank
knows, and rows are drawn in fixed chunks of ``chunk_rows``, each from its own
generator and computed with the same shapes. A rank draws only the chunks
that overlap its rows, and gets bit for bit the rows it would have got from
the whole table, whatever the sp size. Everything runs on the CPU in fp32, so
the tables do not depend on the training device either.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from mosaic import ShardedDim

from .tables import Tables

_ACTIVATIONS = (torch.tanh, torch.relu, torch.sin, torch.abs)


@dataclass(frozen=True)
class PriorConfig:
    """Shapes of the tables the prior draws.

    Args:
        rows: rows per table (train + test).
        max_features: features per table are drawn from ``[1, max_features]``.
        max_classes: classes per table are drawn from ``[2, max_classes]``.
        batch_size: tables per step.
        train_fraction: the split point is drawn from this fraction of ``rows``.
        hidden: width of the random MLPs.
        noise: largest standard deviation of the noise added inside them (drawn per table).
        chunk_rows: rows per generator; fixed so rows never depend on the sharding.
        calibration_rows: rows drawn to place the class boundaries.
    """

    rows: int
    max_features: int = 5
    max_classes: int = 3
    batch_size: int = 8
    train_fraction: tuple[float, float] = (0.3, 0.8)
    hidden: int = 16
    noise: float = 0.1
    chunk_rows: int = 1024
    calibration_rows: int = 2048

    def __post_init__(self) -> None:
        if self.rows < 3:
            raise ValueError(f"rows must be at least 3 (two training rows and a test row), got {self.rows}")
        if self.max_features < 1 or self.max_classes < 2 or self.batch_size < 1:
            raise ValueError(
                f"need max_features >= 1, max_classes >= 2, batch_size >= 1; got "
                f"{self.max_features}, {self.max_classes}, {self.batch_size}"
            )
        low, high = self.train_fraction
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"train_fraction must satisfy 0 < low <= high < 1, got {self.train_fraction}")


@dataclass(frozen=True)
class StepSpec:
    """What every rank agrees on for one batch before drawing its rows."""

    seed: int
    features: int
    train_size: int


def mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of integers and tags (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(mix(*parts))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def draw_spec(config: PriorConfig, *key: int | str, features: int | None = None) -> StepSpec:
    """The batch named by ``key`` (e.g. ``("train", seed, step, dp_rank)``); ``features`` fixes the count."""
    g = _generator("spec", *key)
    low = max(2, math.ceil(config.train_fraction[0] * config.rows))
    high = min(config.rows - 1, math.floor(config.train_fraction[1] * config.rows))
    train_size = _randint(g, low, max(low, high))
    count = _randint(g, 1, config.max_features) if features is None else features
    return StepSpec(seed=mix("batch", *key), features=count, train_size=train_size)


class RandomFunction:
    """One table's random MLP, input distribution and class boundaries."""

    def __init__(self, config: PriorConfig, features: int, seed: int):
        g = _generator(seed)
        h = config.hidden
        self.features, self.hidden = features, h
        self.classes = _randint(g, 2, config.max_classes)
        self.depth = _randint(g, 1, 3)
        self.activation = _ACTIVATIONS[_randint(g, 0, len(_ACTIVATIONS) - 1)]
        self.noise = config.noise * float(torch.rand((), generator=g))
        self.correlation = torch.eye(features) + 0.5 * torch.randn(features, features, generator=g)
        self.scale = torch.randn(features, generator=g).exp()
        self.shift = 2.0 * torch.randn(features, generator=g)
        # About a third of the features play no part (but at least one does).
        relevant = torch.rand(features, generator=g) > 0.3
        relevant[_randint(g, 0, features - 1)] = True
        self.w_in = torch.randn(features, h, generator=g) * relevant.unsqueeze(1) / math.sqrt(features)
        self.b_in = torch.randn(h, generator=g)
        self.layers = [
            (torch.randn(h, h, generator=g) / math.sqrt(h), 0.5 * torch.randn(h, generator=g))
            for _ in range(self.depth - 1)
        ]
        self.w_out = torch.randn(h, generator=g) / math.sqrt(h)
        self.permutation = torch.randperm(self.classes, generator=g)
        calibration = self.output(*self.draw(config.calibration_rows, _generator(seed, "calibration")))
        levels = torch.arange(1, self.classes, dtype=torch.float32) / self.classes
        self.boundaries = torch.quantile(calibration, levels)

    def draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows of latent Gaussian input ``(n, F)`` and hidden noise ``(depth, n, H)``."""
        z = torch.randn(n, self.features, generator=g) @ self.correlation
        noise = self.noise * torch.randn(self.depth, n, self.hidden, generator=g)
        return z, noise

    def output(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h = self.activation(z @ self.w_in + self.b_in) + noise[0]
        for (w, b), eps in zip(self.layers, noise[1:], strict=True):
            h = self.activation(h @ w + b) + eps
        return h @ self.w_out

    def rows(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows: features ``(n, F)`` as observed, labels ``(n,)``."""
        z, noise = self.draw(n, g)
        labels = self.permutation[torch.bucketize(self.output(z, noise), self.boundaries)]
        return z * self.scale + self.shift, labels


def draw_rows(config: PriorConfig, spec: StepSpec, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[start, stop)`` of every table of the batch: ``x (B, n, F)``, ``y (B, n)`` on the CPU."""
    if not 0 <= start < stop <= config.rows:
        raise ValueError(f"rows [{start}, {stop}) are outside [0, {config.rows})")
    chunk = config.chunk_rows
    first, last = start // chunk, (stop - 1) // chunk
    xs, ys = [], []
    for table in range(config.batch_size):
        fn = RandomFunction(config, spec.features, mix(spec.seed, table))
        parts = [fn.rows(chunk, _generator(spec.seed, table, c)) for c in range(first, last + 1)]
        offset = first * chunk
        xs.append(torch.cat([p[0] for p in parts])[start - offset : stop - offset])
        ys.append(torch.cat([p[1] for p in parts])[start - offset : stop - offset])
    return torch.stack(xs), torch.stack(ys)


def sample(config: PriorConfig, spec: StepSpec, rows: ShardedDim, device: torch.device) -> Tables:
    """This rank's rows of the batch ``spec`` describes, on ``device``."""
    if rows.total != config.rows:
        raise ValueError(f"the shard covers {rows.total} rows but the prior draws tables of {config.rows}")
    parts = [draw_rows(config, spec, a, b) for a, b in rows.spans]
    x, y = (torch.cat(t, 1) for t in zip(*parts, strict=True))
    return Tables(x.to(device), y.to(device), spec.train_size, rows)
