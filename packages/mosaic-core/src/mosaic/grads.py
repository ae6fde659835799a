"""Gradients of parameters that every rank of the sp group holds.

Each sp rank computes its parameters' gradients from its own rows only; the
model's gradient is their sum. Data-parallel replicas then average, as DDP
does. :func:`reduce_gradients` does both in one call after ``backward()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .context import Context, get_context


@torch.no_grad()
def reduce_gradients(module: nn.Module, context: Context | None = None, *, average_dp: bool = True) -> None:
    """Sum ``module``'s parameter gradients over the sp group, then average them over dp.

    Call it after ``loss.backward()`` and before ``optimizer.step()``, where
    each sp rank's ``loss`` is its share of the replica's loss (e.g. the sum of
    its rows' terms divided by the global row count). Gradients are flattened
    into one buffer per dtype so each group sees one collective, and summed in
    fp32 (fp64 stays fp64): a bf16 sum of P partial gradients would add an
    error that grows with P.
    """
    ctx = context or get_context()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    steps = []
    if ctx.sp_group is not None and ctx.sp_size > 1:
        steps.append((ctx.sp_group, 1.0))
    if average_dp and ctx.dp_group is not None and ctx.dp_size > 1:
        steps.append((ctx.dp_group, 1.0 / ctx.dp_size))
    if not steps:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        flat = torch.cat([g.reshape(-1) for g in same]).to(torch.promote_types(dtype, torch.float32))
        for group, scale in steps:
            dist.all_reduce(flat, group=group)
            if scale != 1.0:
                flat.mul_(scale)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))
