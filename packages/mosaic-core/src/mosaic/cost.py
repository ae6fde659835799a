"""What a plan costs, forward and backward apart, and the machine rates that turn a cost into seconds.

Every plan carries a :class:`Cost`: for its forward and for its backward
(:class:`Pass`), the attention FLOPs this rank computes, the bytes that reach
it through collectives, how much of that transfer its schedule hides behind
compute and its collective launches; and the extra memory it holds.
:class:`Machine` holds the rates: ``backend="auto"`` ranks candidates by
``Machine.seconds(cost)`` (forward only when no backward will run), and the
scaling model (``benchmarks/scaling_model.py``) predicts step times with it.
Everything here is arithmetic on facts every rank shares: the same on every
rank, no collective, no process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Cost", "Machine", "Pass", "attention_flops", "attention_passes", "default_machine", "set_machine"]


@dataclass(frozen=True)
class Pass:
    """One direction (forward or backward) of a plan on its busiest rank.

    Args:
        flops: attention kernel FLOPs this rank computes.
        bytes: bytes that reach this rank through collectives.
        hidden: the fraction of those bytes whose transfer the schedule can run under
            compute (0: every byte is waited for, as a gather before the kernels;
            1: a double-buffered ring, whose steps overlap).
        collectives: collective launches, a latency term.
    """

    flops: float = 0.0
    bytes: float = 0.0
    hidden: float = 0.0
    collectives: int = 0

    def __add__(self, other: Pass) -> Pass:
        """Two steps one after the other (a composition's exchange and its inner strategy)."""
        total = self.bytes + other.bytes
        hidden = (self.hidden * self.bytes + other.hidden * other.bytes) / total if total else 0.0
        return Pass(self.flops + other.flops, total, hidden, self.collectives + other.collectives)


@dataclass(frozen=True)
class Cost:
    """One call of a plan on its busiest rank: its forward, its backward and the memory it holds.

    ``memory``: bytes held beyond this rank's own q, k, v and output (gathered K/V, tiles).
    """

    forward: Pass = field(default_factory=Pass)
    backward: Pass = field(default_factory=Pass)
    memory: float = 0.0

    @property
    def flops(self) -> float:
        return self.forward.flops + self.backward.flops

    @property
    def bytes(self) -> float:
        return self.forward.bytes + self.backward.bytes

    @property
    def collectives(self) -> int:
        return self.forward.collectives + self.backward.collectives

    def __add__(self, other: Cost) -> Cost:
        """Two steps one after the other; the memory of the larger (they do not overlap)."""
        return Cost(self.forward + other.forward, self.backward + other.backward, max(self.memory, other.memory))


@dataclass(frozen=True)
class Machine:
    """Rates that turn a :class:`Cost` into seconds, and the memory a plan may use."""

    flops_per_s: float
    bytes_per_s: float
    latency_s: float
    memory_budget: float = float("inf")

    def pass_seconds(self, step: Pass) -> float:
        """Compute, plus the transfers the schedule cannot hide under it, plus launch latency."""
        compute = step.flops / self.flops_per_s
        exposed = step.bytes * (1 - step.hidden) / self.bytes_per_s
        hideable = step.bytes * step.hidden / self.bytes_per_s
        return compute + exposed + max(0.0, hideable - compute) + step.collectives * self.latency_s

    def seconds(self, cost: Cost, *, backward: bool = True) -> float:
        """The forward's seconds, plus the backward's when one runs."""
        return self.pass_seconds(cost.forward) + (self.pass_seconds(cost.backward) if backward else 0.0)

    def fits(self, cost: Cost) -> bool:
        return cost.memory <= self.memory_budget


# H200 (docs/benchmarks.md, 2026-11-27): 161 ms for 4*B*H*N^2*d*3.5 FLOPs at (5, 4, 65536, 24) on cuDNN.
_CUDA = Machine(flops_per_s=1.8e14, bytes_per_s=2.7e11, latency_s=2e-5)
# A two-core CPU: only the ordering matters.
_CPU = Machine(flops_per_s=2e10, bytes_per_s=2e9, latency_s=5e-5)
_machine: dict[str, Machine] = {}


def default_machine(device: torch.device) -> Machine:
    """The rates for ``device``: set by :func:`set_machine` or :func:`mosaic.calibrate`, else the measured defaults."""
    kind = device.type
    return _machine.get(kind) or (_CUDA if kind == "cuda" else _CPU)


def set_machine(device_type: str, machine: Machine | None) -> None:
    """Use ``machine`` for ``device_type`` from now on (``None``: the defaults again)."""
    if machine is None:
        _machine.pop(device_type, None)
    else:
        _machine[device_type] = machine


def attention_passes(batch: int, heads: int, head_dim: int, pairs: int) -> tuple[float, float]:
    """FLOPs of attention over ``pairs`` visible (query, key) pairs per head: ``(forward, backward)``.

    The forward is two matmuls (4 d FLOPs a pair); the backward recomputes the
    scores and runs four more (10 d): 3.5 x the forward in all.
    """
    unit = float(batch) * heads * head_dim * pairs
    return 4.0 * unit, 10.0 * unit


def attention_flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """Forward + backward FLOPs of :func:`attention_passes`."""
    return sum(attention_passes(batch, heads, head_dim, pairs))
