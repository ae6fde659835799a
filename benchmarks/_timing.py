"""Timing helpers shared by the benchmarks: CUDA events, median of repeats, fwd+bwd."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def median_ms(
    fn: Callable[[], object], warmup: int = 2, repeats: int = 5, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn`` in ms, timed with CUDA events after ``warmup`` calls.

    ``sync`` (e.g. a barrier) runs before each timed call so ranks start together.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd_ms(attn: Callable, *inputs: torch.Tensor, sync=None, warmup: int = 2, repeats: int = 5) -> float:
    """Median time of ``attn(*inputs)`` forward plus backward with a fixed output gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = None

    def step():
        nonlocal grad
        for t in leaves:
            t.grad = None
        out = attn(*leaves)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return median_ms(step, warmup, repeats, sync)
