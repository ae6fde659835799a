"""Time training steps on one fixed batch: step time, throughput, peak memory per rank."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import mosaic

from .model import NanoTabPFN
from .objective import compute_gradients
from .tables import Tables


def _sync(ctx: mosaic.Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    if ctx.world_size > 1:
        dist.barrier()


def peak_memory_gib(ctx: mosaic.Context) -> list[float]:
    """Every rank's ``torch.cuda.max_memory_allocated`` in GiB (empty on CPU)."""
    if ctx.device.type != "cuda":
        return []
    mine = torch.tensor([torch.cuda.max_memory_allocated(ctx.device) / 2**30], device=ctx.device)
    if ctx.world_size == 1:
        return mine.tolist()
    every = torch.empty(ctx.world_size, device=ctx.device)
    dist.all_gather_into_tensor(every, mine)
    return [round(v, 3) for v in every.tolist()]


def bench_steps(
    model: NanoTabPFN,
    optimizer: torch.optim.Optimizer,
    tables: Tables,
    ctx: mosaic.Context,
    *,
    steps: int,
    warmup: int,
    bf16: bool,
) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` full training steps (forward, backward, gradient sums, AdamW)."""
    times, loss = [], torch.zeros(())

    def one() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = compute_gradients(model, tables, ctx, bf16=bf16)
        optimizer.step()
        return out

    for _ in range(warmup):
        loss = one()
    _sync(ctx)
    for _ in range(steps):
        start = time.perf_counter()
        loss = one()
        _sync(ctx)
        times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    rows = tables.rows.total * tables.batch_size * ctx.dp_size
    return {
        "step_time_s": {"mean": mean, "median": statistics.median(times), "min": min(times), "max": max(times)},
        "steps": steps,
        "warmup": warmup,
        "rows_per_s": rows / mean,
        "peak_memory_gib": peak_memory_gib(ctx),
        "loss": float(loss),
    }
