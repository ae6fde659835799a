"""tabicl 2.2.0's ICL transformer and induced self-attention blocks (imported, random weights), rows sharded.

At P = 1..4, against the package's modules on the whole table (outputs, input
and parameter gradients, fp32 1e-5):

- ``ICLearning.forward`` (training mode): the ICL transformer with scalable
  softmax (QASSMax, TabICL's default, and SSMax), labels of the training rows
  added to their rows, decoder;
- the ICL transformer's K/V-cache path (``Encoder.forward_with_cache``): the
  cache of this rank's training rows, then new test rows (sharded) attending to it;
- ``InducedSelfAttentionBlock`` with QASSMax, a column of skip values on every
  row and one whose skip values fill the first ranks' rows, plain and cached.

Two checks show the comparisons can fail: the scalable softmax with the local
key count, and a skip decision from local rows.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("tabicl", reason="the integrations session installs tabicl==2.2.0")

import torch
from integration_utils import WORLDS, assert_close, assert_grads_close, max_difference, named_grads, randomize_
from tabicl._model.encoders import Encoder
from tabicl._model.kv_cache import KVCache
from tabicl._model.layers import InducedSelfAttentionBlock
from tabicl._model.learning import ICLearning
from tabicl_adapter import RowShardedInducedSelfAttentionBlock, RowShardedMultiheadAttention, shard_icl_rows

import mosaic
from mosaic.testing import run_distributed

D_MODEL, NHEAD, CLASSES, INDS = 16, 2, 4, 8
TABLES, ROWS, TRAIN, NEW_TEST_ROWS = 2, 22, 9, 13
COLUMNS, SKIP = 3, -100.0
QASSMAX = "qassmax-mlp-elementwise"  # TabICL's default for the ICL transformer and the column embedding
ICL_CASES = (("allgather", QASSMAX), ("ring", QASSMAX), ("allgather", "ssmax"))


def make_icl(ssmax: str) -> ICLearning:
    icl = ICLearning(max_classes=CLASSES, out_dim=CLASSES, d_model=D_MODEL, num_blocks=2, nhead=NHEAD,
                     dim_feedforward=2 * D_MODEL, ssmax=ssmax)  # fmt: skip
    return randomize_(icl, seed=5).train()


def isab_config() -> dict:
    return dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=2 * D_MODEL, num_inds=INDS, ssmax=QASSMAX,
                skip_value=SKIP)  # fmt: skip


def make_isab() -> InducedSelfAttentionBlock:
    return randomize_(InducedSelfAttentionBlock(**isab_config()), seed=6)


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(TABLES, ROWS, D_MODEL, generator=g)
    columns = torch.randn(COLUMNS, ROWS, D_MODEL, generator=g)
    columns[1] = SKIP  # skipped by every rank
    columns[2, :11] = SKIP  # not skipped, though the first ranks hold only skip values at P = 2, 3, 4
    new_columns = torch.randn(COLUMNS, NEW_TEST_ROWS, D_MODEL, generator=g)
    new_columns[1] = SKIP
    return {
        "R": rows, "y": torch.randint(0, CLASSES, (TABLES, ROWS), generator=g).float(),
        "w": torch.randn(TABLES, ROWS, CLASSES, generator=g), "R_test": torch.randn(TABLES, NEW_TEST_ROWS, D_MODEL,
        generator=g), "w_enc": torch.randn(TABLES, ROWS, D_MODEL, generator=g), "w_enc_test": torch.randn(
        TABLES, NEW_TEST_ROWS, D_MODEL, generator=g), "cols": columns, "w_cols": torch.randn(columns.shape,
        generator=g), "cols_test": new_columns, "w_cols_test": torch.randn(new_columns.shape, generator=g),
    }  # fmt: skip


def step(module: torch.nn.Module, run, *inputs: torch.Tensor) -> dict:
    """``run(*inputs)`` -> (output, loss); backward; output, input grads, parameter grads (reduced over sp)."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    out, loss = run(*inputs)
    loss.backward()
    if mosaic.is_initialized():
        mosaic.reduce_gradients(module)
    result = {"out": out.detach(), "input_grads": [t.grad for t in inputs], "grads": named_grads(module)}
    module.zero_grad(set_to_none=True)
    return result


def run_all(icls: dict, encoders: dict, isab, data: dict, take, take_test, n_train: int) -> dict:
    """Every path on this rank's rows (``take``/``take_test`` pick them; ``n_train`` this rank's training rows)."""
    y_train = take(data["y"])[:, :n_train]
    results = {}
    for case, icl in icls.items():
        # R * 1: ICLearning adds the label embeddings to R in place, which a leaf would refuse.
        run = lambda r, icl=icl: (out := icl(r * 1, y_train), (out * take(data["w"])[:, n_train:]).sum())
        results[("icl", case)] = step(icl, run, take(data["R"]))
    for case, encoder in encoders.items():
        cache = KVCache()
        with torch.no_grad():
            built = encoder.forward_with_cache(take(data["R"]), cache, train_size=n_train, store_cache=True)
        run = lambda r, encoder=encoder, cache=cache: (
            out := encoder.forward_with_cache(r, cache, use_cache=True, store_cache=False),
            (out * take_test(data["w_enc_test"])).sum(),
        )
        results[("cached", case)] = step(encoder, run, take_test(data["R_test"]))
        results[("cached", case)]["built"] = built
    run = lambda c: (out := isab(c, n_train), (out * take(data["w_cols"])).sum())
    results["isab"] = step(isab, run, take(data["cols"]))
    cache = KVCache()
    with torch.no_grad():
        built = isab.forward_with_cache(take(data["cols"]), cache, 0, train_size=n_train, store_cache=True)
    run = lambda c: (out := isab.forward_with_cache(c, cache, 0, use_cache=True, store_cache=False),
                     (out * take_test(data["w_cols_test"])).sum())  # fmt: skip
    results["isab cached"] = step(isab, run, take_test(data["cols_test"]))
    results["isab cached"]["built"] = built
    return results


def reference_all() -> dict:
    icls = {case: make_icl(case[1]) for case in ICL_CASES}
    encoders = {case: icl.tf_icl for case, icl in icls.items()}
    return run_all(icls, encoders, make_isab(), make_data(), lambda t: t, lambda t: t, TRAIN)


def sharded_all(world: int) -> tuple[dict, tuple[int, ...]]:
    """Task on every rank: every path on this rank's rows."""
    ctx = mosaic.init(sp_size=world)
    rows = ctx.sharded_dim(ROWS, dim=1)
    test_rows = ctx.sharded_dim(NEW_TEST_ROWS)
    icls = {}
    for backend, ssmax in ICL_CASES:
        icl = make_icl(ssmax)
        shard_icl_rows(icl.tf_icl, backend)
        icls[(backend, ssmax)] = icl
    encoders = {case: icl.tf_icl for case, icl in icls.items()}
    isab = RowShardedInducedSelfAttentionBlock(**isab_config(), backend="allgather")
    isab.load_state_dict(make_isab().state_dict())
    take, take_test = (lambda t: rows.take(t, 1)), (lambda t: test_rows.take(t, 1))
    results = run_all(icls, encoders, isab, make_data(), take, take_test, rows.prefix_count(TRAIN))
    return results, (rows.offset, rows.length, test_rows.offset, test_rows.length)


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_all()


@pytest.mark.parametrize("world", WORLDS)
def test_icl_and_induced_attention_with_sharded_rows_match_unsharded(reference: dict, world: int) -> None:
    for rank, (got, (lo, length, test_lo, test_length)) in enumerate(
        run_distributed(sharded_all, world, world, timeout=300)
    ):
        here, test_here = slice(lo, lo + length), slice(test_lo, test_lo + test_length)
        test_of_here = slice(max(lo, TRAIN) - TRAIN, max(lo + length, TRAIN) - TRAIN)
        for key, want in reference.items():
            what = f"P={world} rank {rank} {key}"
            mine = got[key]
            out_rows = {"icl": test_of_here, "cached": test_here, "isab": here, "isab cached": test_here}[
                key[0] if isinstance(key, tuple) else key
            ]
            in_rows = here if key[0] == "icl" or key == "isab" else test_here
            assert_close(mine["out"], want["out"][:, out_rows], f"{what} output")
            got_grad, want_grad = mine["input_grads"][0], want["input_grads"][0][:, in_rows]
            if key == "isab":
                # Rows of skip values are constant vectors: the pre-norm's backward multiplies by
                # 1/sqrt(eps) ~ 316 there (gradients ~ 400, the fp32 reference itself is 8e-4 off
                # fp64). Those rows are checked at 1e-5 of their own scale, apart from the others.
                constant = (make_data()["cols"][:, here] == SKIP).all(-1)
                assert_close(got_grad[constant], want_grad[constant], f"{what} input grad of skip rows")
                got_grad, want_grad = got_grad[~constant], want_grad[~constant]
            assert_close(got_grad, want_grad, f"{what} input grad")
            assert_grads_close(mine["grads"], want["grads"], what)
            if "built" in want:
                assert_close(mine["built"], want["built"][:, here], f"{what} cache-building output")


class LocalKeyCount(RowShardedMultiheadAttention):
    """The mistake the adapter avoids: scalable softmax with this rank's key count."""

    def key_count(self, local: int) -> int:
        return local


def broken_ssmax(world: int) -> list[torch.Tensor]:
    mosaic.init(sp_size=world)
    rows = mosaic.get_context().sharded_dim(ROWS, dim=1)
    data = make_data()
    outs = []
    for attention in (RowShardedMultiheadAttention, LocalKeyCount):
        icl = make_icl(QASSMAX)
        for block in icl.tf_icl.blocks:
            block.attn = attention.from_module(block.attn, "allgather", "sharded")
        with torch.no_grad():
            outs.append(icl(rows.take(data["R"], 1), rows.take(data["y"], 1)[:, : rows.prefix_count(TRAIN)]))
    return outs


def test_ssmax_with_the_local_key_count_differs() -> None:
    """With the local key count the ICL output moves far past the tolerance: the comparison above can fail."""
    for right, wrong in run_distributed(broken_ssmax, 2, 2):
        assert max_difference([(right, wrong)]) > 100 * 1e-5


class LocalSkip(RowShardedInducedSelfAttentionBlock):
    """The mistake the adapter avoids: the package's skip decision on this rank's rows alone."""

    def skipped(self, src: torch.Tensor) -> torch.Tensor:
        return (src == self.skip_value).all(dim=(-2, -1))


def broken_skip(world: int) -> tuple[str, str]:
    mosaic.init(sp_size=world)
    rows = mosaic.get_context().sharded_dim(ROWS, dim=1)
    isab = LocalSkip(**isab_config(), backend="allgather")
    try:
        isab(rows.take(make_data()["cols"], 1), rows.prefix_count(TRAIN))
    except ValueError as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


def test_local_skip_decision_raises_on_every_rank() -> None:
    """Rank 0 would skip column 2 and rank 1 would not: Mosaic sees the batches differ and every rank raises."""
    results = run_distributed(broken_skip, 2, 2)
    assert results[0] == results[1]
    assert results[0][0] == "ValueError" and "batch" in results[0][1], results[0]


def test_state_dicts_load_into_the_sharded_modules() -> None:
    icl = make_icl(QASSMAX)
    sharded = copy.deepcopy(icl)
    shard_icl_rows(sharded.tf_icl, "allgather")
    sharded.load_state_dict(icl.state_dict())
    assert isinstance(sharded.tf_icl, Encoder)
    assert all(isinstance(b.attn, RowShardedMultiheadAttention) for b in sharded.tf_icl.blocks)
    RowShardedInducedSelfAttentionBlock(**isab_config()).load_state_dict(make_isab().state_dict())
