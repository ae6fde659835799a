"""Gradients of parameters that every rank of the sp group holds.

Each sp rank computes its parameters' gradients from its own rows only; the
model's gradient is their sum. Data-parallel replicas then average, as DDP
does. :func:`reduce_gradients` does both in one call after ``backward()``.

Before it reduces, the sp ranks agree on their sharded calls since the last
agreement (the step's agreement, :mod:`mosaic.agreement`) and the ranks of the
world compare a digest of their parameter lists — names, shapes, dtypes, in
order — so models built differently on different ranks raise on every rank
instead of summing mismatched buffers. A parameter without a
gradient on some rank counts as zeros there: every rank joins the same
collectives with the same layout.

``MOSAIC_CHECK_REPLICAS=N`` (a debug switch) compares every parameter's sum
across the world every ``N`` calls and raises on every rank when the
replicas' weights have drifted apart, which would otherwise give silently
wrong results.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import comm
from ._compat import all_gather_single
from .agreement import GRADIENTS, HELPER, STEP, site_id
from .context import Context, get_context

__all__ = ["check_replicas", "reduce_gradients"]

_calls = 0


@torch.no_grad()
def reduce_gradients(module: nn.Module, context: Context | None = None, *, average_dp: bool = True) -> None:
    """Sum ``module``'s parameter gradients over the sp group, then average them over dp.

    Call it on every rank after ``loss.backward()`` and before ``optimizer.step()``,
    where each sp rank's ``loss`` is its share of the replica's loss (e.g. the sum
    of its rows' terms divided by the global row count). Gradients are flattened
    into one buffer per dtype so each group sees one collective, and summed in
    fp32 (fp64 stays fp64): a bf16 sum of P partial gradients would add an
    error that grows with P. A parameter whose ``.grad`` is ``None`` on this rank
    takes part as zeros (and gets the reduced gradient).
    """
    global _calls
    ctx = context or get_context()
    params = [p for p in module.parameters() if p.requires_grad]
    steps = []
    if ctx.sp_group is not None and ctx.sp_size > 1:
        steps.append((ctx.sp_group, 1.0))
    if average_dp and ctx.dp_group is not None and ctx.dp_size > 1:
        steps.append((ctx.dp_group, 1.0 / ctx.dp_size))
    if not steps:
        return
    what = f"reduce_gradients({type(module).__name__})"
    ctx.agreement.round(STEP, what, site=site_id("step"))
    names = [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters() if p.requires_grad]
    rows = ctx.world_agreement.round(GRADIENTS, what, [site_id(repr(names)), len(names)])
    if len({r for r in rows}) != 1:
        counts = [r[1] for r in rows]
        raise ValueError(
            f"reduce_gradients: the ranks' models differ (parameter names, shapes or order; counts {counts}); "
            "every rank must build the same model and pass it to reduce_gradients"
        )
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, same in by_dtype.items():
        wide = torch.promote_types(dtype, torch.float32)
        flat = torch.cat([_flat_grad(p, wide) for p in same])
        for group, scale in steps:
            comm.all_reduce(flat, group)
            if scale != 1.0:
                flat.mul_(scale)
        for p, part in zip(same, flat.split([p.numel() for p in same]), strict=True):
            if p.grad is None:
                p.grad = part.view_as(p).to(dtype)
            else:
                p.grad.copy_(part.view_as(p))
    _calls += 1
    every = int(os.environ.get("MOSAIC_CHECK_REPLICAS", "0") or 0)
    if every > 0 and _calls % every == 0:
        check_replicas(module, ctx)


def _flat_grad(p: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros(p.numel(), dtype=dtype, device=p.device)
    return p.grad.reshape(-1).to(dtype)


@torch.no_grad()
def check_replicas(module: nn.Module, context: Context | None = None) -> None:
    """Raise on every rank if ``module``'s parameters differ between ranks (they must be replicas).

    Compares every parameter's sum (fp64) across the world: replicas hold the
    same bits, so their sums are equal exactly.
    """
    ctx = context or get_context()
    if ctx.world_size == 1:
        return
    params = list(module.named_parameters())
    sums = torch.stack([p.detach().double().sum() for _, p in params]).to(ctx.device)
    every = torch.empty(ctx.world_size * sums.numel(), dtype=sums.dtype, device=sums.device)
    all_gather_single(every, sums)
    table = every.view(ctx.world_size, -1).cpu()
    differ = [name for i, (name, _) in enumerate(params) if not bool((table[:, i] == table[0, i]).all())]
    # Every rank computed the same table, so every rank raises (or none does).
    ctx.world_agreement.round(HELPER, "check_replicas", [len(differ)])
    if differ:
        raise RuntimeError(
            f"the ranks' copies of the model differ (MOSAIC_CHECK_REPLICAS): parameters {differ[:8]}"
            f"{' ...' if len(differ) > 8 else ''} are not the same on every rank; start every rank from the "
            "same weights (the same seed, or load one checkpoint) and reduce gradients on every rank"
        )
