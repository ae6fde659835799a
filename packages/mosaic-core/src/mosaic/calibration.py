"""``mosaic.calibrate``: measure this machine's rates for ``backend="auto"``, agreed over the sp group."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from . import comm
from ._compat import all_gather_single
from .context import Context, get_context
from .cost import Machine, default_machine, set_machine

__all__ = ["calibrate"]


def calibrate(context: Context | None = None, *, memory_budget: float | None = None, seconds: float = 0.2) -> Machine:
    """Measure this machine's rates (a matmul and an all-gather on the sp group) and use them.

    Collective over the sp group: every rank measures, and the slowest rank's
    rates are taken, so that every rank ranks the backends the same way.
    """
    ctx = context or get_context()
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    flops_per_s = 2 * 2048**3 / _time(lambda: a @ a, device, seconds)
    bytes_per_s, latency = float("inf"), 0.0
    if ctx.sp_group is not None and ctx.sp_size > 1:
        part = torch.empty(16 << 20, dtype=torch.uint8, device=device)
        whole = torch.empty(ctx.sp_size * part.numel(), dtype=torch.uint8, device=device)
        gather = lambda: all_gather_single(whole, part, group=ctx.sp_group)
        bytes_per_s = (ctx.sp_size - 1) * part.numel() / _time(gather, device, seconds)
        tiny = torch.empty(ctx.sp_size, dtype=torch.uint8, device=device)
        latency = _time(lambda: all_gather_single(tiny, tiny[:1].clone(), group=ctx.sp_group), device, seconds / 4)
        # The slowest rank decides: every rank must rank the same way.
        rates = torch.tensor([1 / flops_per_s, 1 / bytes_per_s, latency], dtype=torch.float64, device=device)
        comm.all_reduce(rates, ctx.sp_group, dist.ReduceOp.MAX)
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
