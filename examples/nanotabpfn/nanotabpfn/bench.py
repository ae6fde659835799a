"""Time training steps on one fixed batch: step time, throughput, peak memory per rank."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import mosaic

from .model import NanoTabPFN
from .objective import autocast, compute_gradients, local_loss
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
    inference: bool = False,
) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` full training steps (forward, backward, gradient sums, AdamW).

    With ``inference``, a step is the forward alone under ``torch.no_grad`` (the predictions
    of every test row); the loss reported is that forward's.
    """
    times, loss = [], torch.zeros(())

    def one() -> torch.Tensor:
        if inference:
            with torch.no_grad(), autocast(ctx.device, bf16):
                logits = model(tables.x, tables.y, tables.train_size, tables.rows)
            return local_loss(logits, tables)
        optimizer.zero_grad(set_to_none=True)
        out = compute_gradients(model, tables, ctx, bf16=bf16)
        optimizer.step()
        return out

    for _ in range(warmup):
        loss = one()
    _sync(ctx)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)  # the peak of the timed steps (warm-up included no more)
    for _ in range(steps):
        start = time.perf_counter()
        loss = one()
        _sync(ctx)
        times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    rows = tables.rows.total * tables.batch_size * ctx.dp_size
    return {
        "step_time_s": {"mean": mean, "median": statistics.median(times), "min": min(times), "max": max(times)},
        "mode": "inference" if inference else "training",
        "steps": steps,
        "warmup": warmup,
        "rows_per_s": rows / mean,
        "peak_memory_gib": peak_memory_gib(ctx),
        "loss": float(loss),
    }
