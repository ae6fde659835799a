"""nanoTabPFN (the public model.py's architecture) with rows sharded at P = 1..4 == unsharded.

One training step: logits of the test rows, the loss, the gradient of the
input table and of every parameter, against the model on the whole table.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from integration_utils import WORLDS, assert_close, assert_grads_close, named_grads, randomize_
from nanotabpfn_adapter import ShardedNanoTabPFN
from nanotabpfn_model import NanoTabPFNModel

import mosaic
from mosaic.testing import run_distributed

CONFIG = dict(embedding_size=16, num_attention_heads=2, mlp_hidden_size=24, num_layers=2, num_outputs=3)
# 22 rows, the first 9 for training: at P = 2, 3, 4 the split falls inside a shard, and at P = 3, 4
# some ranks hold test rows only (no keys), at P = 4 rank 0 holds training rows only.
TABLES, ROWS, TRAIN, FEATURES = 2, 22, 9, 3
BACKENDS = ("allgather", "ring")


def make_model() -> NanoTabPFNModel:
    return randomize_(NanoTabPFNModel(**CONFIG), seed=1)


def make_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Features on different scales (the normalisation matters) and labels in [0, 3)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TABLES, ROWS, FEATURES, generator=g) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0, 3.0, -1])
    y = torch.randint(0, CONFIG["num_outputs"], (TABLES, ROWS), generator=g).float()
    return x, y


def reference_step() -> dict:
    model = make_model()
    x, y = make_table()
    x.requires_grad_()
    logits = model((x, y[:, :TRAIN]), TRAIN)
    loss = F.cross_entropy(logits.flatten(0, 1), y[:, TRAIN:].flatten().long())
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.item(), "x_grad": x.grad, "grads": named_grads(model)}


def sharded_step(world: int) -> dict[str, dict]:
    """Task on every rank: one step on this rank's rows for each backend."""
    ctx = mosaic.init(sp_size=world)
    rows = ctx.sharded_dim(ROWS, dim=1)
    x, y = make_table()
    local_train = rows.prefix_count(TRAIN)
    out = {}
    for backend in BACKENDS:
        model = ShardedNanoTabPFN(make_model(), backend)
        x_local = rows.take(x, 1).requires_grad_()
        y_local = rows.take(y, 1)
        logits = model(x_local, y_local[:, :local_train], TRAIN, rows)
        # Each rank's loss is its share of the mean over every test row.
        loss = F.cross_entropy(logits.flatten(0, 1), y_local[:, local_train:].flatten().long(), reduction="sum")
        loss = loss / (TABLES * (ROWS - TRAIN))
        loss.backward()
        mosaic.reduce_gradients(model)
        out[backend] = {
            "logits": logits.detach(), "loss": loss.item(), "x_grad": x_local.grad, "grads": named_grads(model.model),
            "offset": rows.offset, "length": rows.length,
        }  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_step()


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_rows_match_unsharded(reference: dict, world: int) -> None:
    results = run_distributed(sharded_step, world, world, timeout=240)
    for backend in BACKENDS:
        ranks = [r[backend] for r in results]
        assert sum(r["loss"] for r in ranks) == pytest.approx(reference["loss"], abs=1e-5)
        for rank, got in enumerate(ranks):
            what = f"P={world} {backend} rank {rank}"
            lo, hi = got["offset"], got["offset"] + got["length"]
            # This rank's test rows are the global test rows [max(lo, TRAIN), max(hi, TRAIN)).
            test = slice(max(lo, TRAIN) - TRAIN, max(hi, TRAIN) - TRAIN)
            assert_close(got["logits"], reference["logits"][:, test], f"{what} logits")
            assert_close(got["x_grad"], reference["x_grad"][:, lo:hi], f"{what} input grad")
            assert_grads_close(got["grads"], reference["grads"], what)


def test_state_dict_of_the_unsharded_model_loads() -> None:
    """The converted model keeps every parameter name: the unsharded checkpoint loads strictly."""
    model = make_model()
    sharded = ShardedNanoTabPFN(copy.deepcopy(model), "allgather")
    sharded.model.load_state_dict(model.state_dict())
    attention = sharded.model.transformer_blocks[0].self_attention_between_datapoints
    assert isinstance(attention, mosaic.MultiheadAttention) and attention.backend_name == "allgather"
