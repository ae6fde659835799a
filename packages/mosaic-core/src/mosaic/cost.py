"""What a plan costs, and the machine constants that turn a cost into seconds.

Every plan carries a :class:`Cost`: the attention FLOPs this rank computes,
the bytes that reach it through collectives, how much of that transfer its
schedule hides behind compute, the extra memory it holds and its collective
launches, forward and backward together. :class:`Machine` holds the rates
those become seconds with; ``backend="auto"`` ranks the plans of every
backend that accepts a problem by :meth:`Machine.seconds` and runs the
cheapest whose memory fits the budget.

The default rates are measurements (docs/benchmarks.md): H200, torch 2.11,
bf16, cuDNN at head dim 24 runs attention at about 180 TFLOP/s forward and
backward together; NCCL all-gather moved 309 GB/s and P2P 271 GB/s on one
NVLink host; a host collective of a few bytes costs about 50 µs on gloo and
20 µs on NCCL. On CPU the rates only need to order the strategies, which
the same byte and FLOP counts do. :func:`calibrate` measures them on the
machine at hand instead, agreed over the sp group so that every rank ranks
the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

__all__ = ["Cost", "Machine", "attention_flops", "calibrate", "default_machine", "set_machine"]


@dataclass(frozen=True)
class Cost:
    """One call of a plan on this rank, forward + backward.

    Args:
        flops: attention kernel FLOPs this rank computes.
        bytes: bytes that reach this rank through collectives.
        hidden: the fraction of those bytes whose transfer the schedule can run under
            compute (0: every byte is waited for, as a gather before the kernels;
            1: a double-buffered ring, whose steps overlap).
        memory: bytes held beyond this rank's own q, k, v and output (gathered K/V, tiles).
        collectives: collective launches, a latency term.
    """

    flops: float = 0.0
    bytes: float = 0.0
    hidden: float = 0.0
    memory: float = 0.0
    collectives: int = 0

    def __add__(self, other: Cost) -> Cost:
        """Two steps one after the other (a composition's exchange and its inner strategy)."""
        total = self.bytes + other.bytes
        hidden = (self.hidden * self.bytes + other.hidden * other.bytes) / total if total else 0.0
        memory, collectives = max(self.memory, other.memory), self.collectives + other.collectives
        return Cost(self.flops + other.flops, total, hidden, memory, collectives)


@dataclass(frozen=True)
class Machine:
    """Rates that turn a :class:`Cost` into seconds, and the memory a plan may use."""

    flops_per_s: float
    bytes_per_s: float
    latency_s: float
    memory_budget: float = float("inf")

    def seconds(self, cost: Cost) -> float:
        """Compute, plus the transfers the schedule cannot hide under it, plus launch latency."""
        compute = cost.flops / self.flops_per_s
        exposed = cost.bytes * (1 - cost.hidden) / self.bytes_per_s
        hideable = cost.bytes * cost.hidden / self.bytes_per_s
        return compute + exposed + max(0.0, hideable - compute) + cost.collectives * self.latency_s

    def fits(self, cost: Cost) -> bool:
        return cost.memory <= self.memory_budget


# H200 (docs/benchmarks.md, 2026-11-27): 161 ms for 4*B*H*N^2*d*3.5 FLOPs at (5, 4, 65536, 24).
_CUDA = Machine(flops_per_s=1.8e14, bytes_per_s=2.7e11, latency_s=2e-5)
# A two-core CPU: only the ordering matters.
_CPU = Machine(flops_per_s=2e10, bytes_per_s=2e9, latency_s=5e-5)
_machine: dict[str, Machine] = {}


def default_machine(device: torch.device) -> Machine:
    """The rates for ``device``: set by :func:`set_machine` or :func:`calibrate`, else the measured defaults."""
    kind = device.type
    return _machine.get(kind) or (_CUDA if kind == "cuda" else _CPU)


def set_machine(device_type: str, machine: Machine | None) -> None:
    """Use ``machine`` for ``device_type`` from now on (``None``: the defaults again)."""
    if machine is None:
        _machine.pop(device_type, None)
    else:
        _machine[device_type] = machine


def attention_flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """FLOPs of attention over ``pairs`` visible (query, key) pairs per head, forward + backward.

    The forward is two matmuls (4 d FLOPs a pair); the backward recomputes the
    scores and runs four more (10 d): 3.5 x the forward in all.
    """
    return 14.0 * batch * heads * head_dim * pairs


def calibrate(context=None, *, memory_budget: float | None = None, seconds: float = 0.2) -> Machine:
    """Measure this machine's rates (a matmul and an all-gather on the sp group) and use them.

    Collective over the sp group: every rank measures, and the slowest rank's
    rates are taken, so that every rank ranks the backends the same way.
    """
    from .context import get_context

    ctx = context or get_context()
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    flops_per_s = 2 * 2048**3 / _time(lambda: a @ a, device, seconds)
    bytes_per_s, latency = float("inf"), 0.0
    if ctx.sp_group is not None and ctx.sp_size > 1:
        part = torch.empty(16 << 20, dtype=torch.uint8, device=device)
        whole = torch.empty(ctx.sp_size * part.numel(), dtype=torch.uint8, device=device)
        from ._compat import all_gather_single

        gather = lambda: all_gather_single(whole, part, group=ctx.sp_group)
        bytes_per_s = (ctx.sp_size - 1) * part.numel() / _time(gather, device, seconds)
        tiny = torch.empty(ctx.sp_size, dtype=torch.uint8, device=device)
        latency = _time(lambda: all_gather_single(tiny, tiny[:1].clone(), group=ctx.sp_group), device, seconds / 4)
        # The slowest rank decides: every rank must rank the same way.
        rates = torch.tensor([1 / flops_per_s, 1 / bytes_per_s, latency], dtype=torch.float64, device=device)
        dist.all_reduce(rates, op=dist.ReduceOp.MAX, group=ctx.sp_group)
        flops_per_s, bytes_per_s, latency = 1 / rates[0].item(), 1 / rates[1].item(), rates[2].item()
    budget = memory_budget
    if budget is None:
        budget = torch.cuda.mem_get_info(device)[0] * 0.8 if device.type == "cuda" else float("inf")
    machine = replace(default_machine(device), flops_per_s=flops_per_s, bytes_per_s=bytes_per_s, latency_s=latency)
    machine = replace(machine, memory_budget=budget)
    set_machine(device.type, machine)
    return machine


def _time(fn, device: torch.device, seconds: float) -> float:
    """Seconds per call of ``fn``, run repeatedly for about ``seconds``."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls
