"""tabpfn 9.2.0's TabPFN v2 encoder block (imported, random weights) with rows sharded at P = 1..4 == unsharded.

Three paths of ``TabPFNBlock``, each against the package's own block on the
whole table, outputs and gradients (input and every parameter, fp32 1e-5):

- training: training rows attend to training rows, test rows to training rows with kv head 0;
- cache build (``return_kv=True``): the same, plus this rank's part of the K/V cache;
- cache inference (``cached_kv=...``): new test rows, sharded too, attend to the row-sharded cache.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("tabpfn", reason="the integrations session installs tabpfn==9.2.0")

import torch
import torch.nn.functional as F
from integration_utils import WORLDS, assert_close, assert_grads_close, max_difference, named_grads, randomize_
from tabpfn.architectures.tabpfn_v2 import TabPFNBlock
from tabpfn_adapter import RowShardedAlongColumnAttention, shard_rows

import mosaic
from mosaic.testing import run_distributed

EMSIZE, NHEAD = 24, 3
TABLES, ROWS, TRAIN, GROUPS, NEW_TEST_ROWS = 2, 22, 9, 3, 13
BACKENDS = ("allgather", "ring")


def make_block() -> TabPFNBlock:
    return randomize_(TabPFNBlock(emsize=EMSIZE, nhead=NHEAD, dim_feedforward=2 * EMSIZE), seed=3)


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    shape = (TABLES, ROWS, GROUPS + 1, EMSIZE)
    test_shape = (TABLES, NEW_TEST_ROWS, GROUPS + 1, EMSIZE)
    return {
        "x": torch.randn(shape, generator=g), "weight": torch.randn(shape, generator=g),
        "x_test": torch.randn(test_shape, generator=g), "weight_test": torch.randn(test_shape, generator=g),
    }  # fmt: skip


def run_paths(block, data: dict[str, torch.Tensor], n_train: int, take, take_test) -> dict:
    """The three paths on ``block``; ``take``/``take_test`` pick this rank's rows of a full tensor.

    Each loss is linear in the block's output with random weights, summed over this rank's
    rows: the ranks' losses add up to the unsharded loss.
    """
    results = {}
    for path in ("train", "build"):
        x = take(data["x"]).requires_grad_()
        out, entry = block(x, n_train, None, return_kv=path == "build")
        (out * take(data["weight"])).sum().backward()
        results[path] = {"out": out.detach(), "x_grad": x.grad, "block": block}
        if entry is not None:
            results[path]["cache"] = (entry.key, entry.value)
        results[path]["grads"] = reduced_grads(block)
    x_test = take_test(data["x_test"]).requires_grad_()
    out, _ = block(x_test, 0, None, cached_kv=entry)
    (out * take_test(data["weight_test"])).sum().backward()
    results["cached"] = {"out": out.detach(), "x_grad": x_test.grad, "grads": reduced_grads(block)}
    for r in results.values():
        r.pop("block", None)
    return results


def reduced_grads(block) -> dict[str, torch.Tensor]:
    """The parameters' gradients summed over the sp group (a no-op unsharded); then zeroed for the next path."""
    if mosaic.is_initialized():
        mosaic.reduce_gradients(block)
    grads = named_grads(block)
    block.zero_grad(set_to_none=True)
    return grads


def sharded_paths(world: int) -> dict[str, dict]:
    """Task on every rank: the three paths on this rank's rows, for each backend."""
    ctx = mosaic.init(sp_size=world)
    rows = ctx.sharded_dim(ROWS, dim=1)
    test_rows = ctx.sharded_dim(NEW_TEST_ROWS)
    out = {}
    for backend in BACKENDS:
        block = shard_rows(make_block(), backend)
        got = run_paths(block, make_inputs(), rows.prefix_count(TRAIN), lambda t: rows.take(t, 1),
                        lambda t: test_rows.take(t, 1))  # fmt: skip
        got["rows"] = (rows.offset, rows.length, rows.prefix_count(TRAIN), test_rows.offset, test_rows.length)
        out[backend] = got
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_paths(make_block(), make_inputs(), TRAIN, lambda t: t.clone(), lambda t: t.clone())


@pytest.mark.parametrize("world", WORLDS)
def test_block_with_sharded_rows_matches_unsharded(reference: dict, world: int) -> None:
    results = run_distributed(sharded_paths, world, world, timeout=240)
    for backend in BACKENDS:
        for rank, got in enumerate(r[backend] for r in results):
            lo, length, local_train, test_lo, test_length = got["rows"]
            here, test_here = slice(lo, lo + length), slice(test_lo, test_lo + test_length)
            for path in ("train", "build", "cached"):
                what = f"P={world} {backend} rank {rank} {path}"
                rows_of = test_here if path == "cached" else here
                assert_close(got[path]["out"], reference[path]["out"][:, rows_of], f"{what} output")
                assert_close(got[path]["x_grad"], reference[path]["x_grad"][:, rows_of], f"{what} input grad")
                assert_grads_close(got[path]["grads"], reference[path]["grads"], what)
            # This rank's cache is the unsharded cache's rows of this rank's training rows.
            train_here = slice(lo, lo + local_train)
            for got_t, want_t in zip(got["build"]["cache"], reference["build"]["cache"], strict=True):
                assert_close(got_t, want_t[:, train_here], f"P={world} {backend} rank {rank} cache")


def test_state_dict_loads_into_the_sharded_block() -> None:
    block = make_block()
    sharded = shard_rows(copy.deepcopy(block), "allgather")
    assert isinstance(sharded.per_column_attention_between_cells, RowShardedAlongColumnAttention)
    sharded.load_state_dict(block.state_dict())


def test_test_rows_see_only_kv_head_0() -> None:
    """The comparison can tell kv head 0 from every head: attending test rows with all heads gives other outputs."""
    block = make_block()
    attention = block.per_column_attention_between_cells
    x = make_inputs()["x"][:, :, 0]  # (B, R, E): one column's cells
    want, _ = attention(x, single_eval_pos=TRAIN)
    q, k, v = (p(x).unflatten(-1, (NHEAD, -1)).transpose(1, 2)
               for p in (attention.q_projection, attention.k_projection, attention.v_projection))  # fmt: skip
    every_head = F.scaled_dot_product_attention(q, k[:, :, :TRAIN], v[:, :, :TRAIN])
    wrong = attention.out_projection(every_head.transpose(1, 2).flatten(2))
    assert max_difference([(wrong[:, TRAIN:], want[:, TRAIN:])]) > 100 * 1e-5
    assert_close(wrong[:, :TRAIN], want[:, :TRAIN], "training rows use every head")
