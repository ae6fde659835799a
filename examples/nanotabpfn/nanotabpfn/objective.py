"""The loss on sharded rows, one step's gradients, and accuracy counts.

The distributed-autograd rule: every rank must run the backward through every
Mosaic attention layer, because those backwards run collectives (the ring's
second pass, the all-gather's reduce-scatter) that all ranks of the sp group
must join. A rank whose loss did not depend on its attention outputs would
skip them and leave the others waiting forever. Indexing the local test rows
(``logits[:, local_test_rows]``) does exactly that on a rank that holds only
training rows. So the decoder runs on every local row and the cross-entropy
is multiplied by a 0/1 test mask and divided by the *global* test-row count:
every rank's loss depends on all of its outputs (with zero gradient on train
rows), and the ranks' losses add up to the model's loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mosaic

from .model import NanoTabPFN
from .tables import Tables


def local_loss(logits: torch.Tensor, tables: Tables) -> torch.Tensor:
    """This rank's share of the mean test-row cross-entropy (the shares sum to the batch's loss)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tables.y.flatten(), reduction="none").view_as(tables.y)
    mask = tables.test_mask().to(ce.dtype)
    return (ce * mask).sum() / (tables.batch_size * tables.test_rows)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; a no-op otherwise (CPU runs stay fp32)."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def compute_gradients(model: NanoTabPFN, tables: Tables, ctx: mosaic.Context, *, bf16: bool = False) -> torch.Tensor:
    """Forward and backward on this rank's rows; leaves the replica's gradients in ``.grad``.

    Gradients are summed over the sp group (each rank's share is its rows'
    terms) and averaged over data-parallel replicas. Returns the loss averaged
    over replicas, the same value on every rank (detached).
    """
    with autocast(ctx.device, bf16):
        logits = model(tables.x, tables.y, tables.train_size, tables.rows)
    loss = local_loss(logits, tables)
    loss.backward()
    mosaic.reduce_gradients(model, ctx)
    total = loss.detach().clone()
    if ctx.world_size > 1:
        dist.all_reduce(total)
        total /= ctx.dp_size
    return total


@torch.no_grad()
def count_correct(
    model: NanoTabPFN, tables: Tables, ctx: mosaic.Context, *, bf16: bool = False
) -> tuple[float, float, float]:
    """``(correct, majority, test rows)`` summed over the tables and the sp group.

    ``majority`` counts the test rows that predicting each table's most
    frequent training class gets right: the baseline accuracy must beat.
    """
    with autocast(ctx.device, bf16):
        logits = model(tables.x, tables.y, tables.train_size, tables.rows)
    test = tables.test_mask()
    labels = F.one_hot(tables.y, model.num_outputs).to(torch.float64)
    hits = (logits.argmax(-1) == tables.y).to(torch.float64)
    # One reduction for all counts: per table, train and test rows of each class, then hits.
    per_row = torch.cat([labels * ~test.view(1, -1, 1), labels * test.view(1, -1, 1), (hits * test).unsqueeze(-1)], -1)
    counts = mosaic.sharded.sum(per_row, 1, over=tables.rows)
    train_counts, test_counts, correct = counts.split([model.num_outputs, model.num_outputs, 1], 1)
    majority = test_counts.gather(1, train_counts.argmax(1, keepdim=True))
    return correct.sum().item(), majority.sum().item(), float(tables.batch_size * tables.test_rows)
