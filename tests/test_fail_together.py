"""Every rank fails together: each way ranks can disagree ends with the same clear error on every rank.

Every case runs on gloo with a short collective timeout, for every distributed
strategy, at P = 2 and 3 (4 where it adds a case), in the default mode: the
ranks agree when a plan is made and once per step (:mod:`mosaic.agreement`).
A task catches the error on each rank and returns its type and message; the
test asserts that every rank raised, the same type and message, within the
step (a step ends with a backward pass, ``reduce_gradients`` or ``ctx.step``)
or ``collective_timeout``, and that nothing returned a result instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.nn as nn

import mosaic
from mosaic.testing import run_distributed

TIMEOUT = timedelta(seconds=3)
E, HEADS = 24, 6  # heads split over 2 and 3 ranks (ulysses, composed)
WORLDS = [2, 3]


def _strategies(world: int) -> dict[str, dict]:
    """Every installed distributed strategy with options that fit ``world`` ranks."""
    every = {
        "allgather": {},
        "ring": {},
        "mesh2d": {"mesh_shape": (1, world)},
        "ulysses": {},
        "composed": {"mesh_shape": (world, 1)},
        "hierarchical": {"intra_node_size": 1},
        "switch": {},
    }
    installed = mosaic.available_backends()
    return {name: options for name, options in every.items() if name in installed}


def _outcome(fn) -> tuple[str, str, float]:
    """``(exception type, message, seconds)`` of ``fn()``; ``("none", "", s)`` when it returned."""
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # every rank must end up here
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "none", "", time.monotonic() - start


def _init(world: int) -> mosaic.Context:
    return mosaic.init(sp_size=world, collective_timeout=TIMEOUT)


def _module(name: str, options: dict, **kw) -> mosaic.MultiAxisAttention:
    torch.manual_seed(0)
    return mosaic.MultiAxisAttention(E, HEADS, 1, backend=name, backend_options=options, **kw)


def _input(ctx: mosaic.Context, rows: int = 12, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return ctx.shard(torch.randn(batch, rows, 3, E), 1)


def _assert_together(results: list[dict[str, tuple[str, str, float]]], *expected: str, within: float = 30.0) -> None:
    """Every rank raised in every case, the same error, naming ``expected``, in bounded time."""
    for case in results[0]:
        outcomes = [r[case] for r in results]
        kinds = {o[0] for o in outcomes}
        assert "none" not in kinds, f"{case}: a rank went on: {outcomes}"
        assert len(kinds) == 1 and len({o[1] for o in outcomes}) == 1, f"{case}: ranks differ: {outcomes}"
        for word in expected:
            assert word in outcomes[0][1], f"{case}: {word!r} not in {outcomes[0][1]!r}"
        assert max(o[2] for o in outcomes) < within, f"{case}: took {max(o[2] for o in outcomes):.1f} s"


# -- a check that fails on one rank only ----------------------------------------------------------


def _one_rank_bad_input(world: int, what: str) -> dict:
    ctx = _init(world)
    out = {}
    for name, options in _strategies(world).items():
        module = _module(name, options)
        x, kv_len = _input(ctx), None
        if ctx.sp_rank == world - 1:
            if what == "dtype":
                x = x.double()
            elif what == "embed":
                x = x[..., : E // 2]
            elif what == "kv_len":
                kv_len = 2.5
        out[name] = _outcome(lambda m=module, x=x, kv_len=kv_len: m(x, kv_len=kv_len))
    return out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    ("what", "words"),
    [("dtype", ["torch.float64", "raised together"]), ("embed", ["embed size 12"]), ("kv_len", ["kv_len must be"])],
)
def test_a_check_that_fails_on_one_rank_fails_on_every_rank(world: int, what: str, words: list[str]) -> None:
    _assert_together(run_distributed(_one_rank_bad_input, world, world, what), *words, f"rank(s) [{world - 1}]")


def _grid_embed(world: int) -> dict:
    ctx = _init(world)
    mesh = (2, world // 2) if world % 2 == 0 else (1, world)
    module = mosaic.MultiAxisAttention2D(E, HEADS, 1, 2, mesh)
    x = module.shard(torch.randn(2, 4, 6, E))
    if ctx.sp_rank == 1:
        x = x[..., :12]
    return {"2-D": _outcome(lambda: module(x))}


@pytest.mark.parametrize("world", [2, 4])
def test_two_d_embed_mismatch_fails_on_every_rank(world: int) -> None:
    if "mesh2d" not in mosaic.available_backends():
        pytest.skip("MultiAxisAttention2D needs mosaic-mesh2d")
    _assert_together(run_distributed(_grid_embed, world, world), "embed size 12")


# -- facts that decide the schedule --------------------------------------------------------------


def _layouts(world: int, case: str) -> dict:
    ctx = _init(world)
    out = {}
    for name, options in _strategies(world).items():
        if case == "ranks differ":
            layout = "zigzag" if ctx.sp_rank == 0 else "contiguous"
            module = _module(name, options, layout=layout)
            torch.manual_seed(1)
            x = ctx.shard(torch.randn(2, 12, 3, E), 1, layout)
        else:  # a zigzag module fed contiguous shards
            module = _module(name, options, layout="zigzag")
            x = _input(ctx, rows=12)
        out[name] = _outcome(lambda m=module, x=x: m(x, causal=True))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_layouts_that_differ_fail_on_every_rank(world: int) -> None:
    _assert_together(run_distributed(_layouts, world, world, "ranks differ"), "layout")


@pytest.mark.parametrize("world", [3])
def test_a_zigzag_module_on_contiguous_shards_fails_on_every_rank(world: int) -> None:
    _assert_together(run_distributed(_layouts, world, world, "zigzag module"), "layout='zigzag'", "contiguous")


def _options_differ(world: int) -> dict:
    ctx = _init(world)
    first = ctx.sp_rank == 0
    cases = {
        "allgather chunks": ("allgather", {"chunks": 1 if first else 2}),
        "mesh2d mesh_shape": ("mesh2d", {"mesh_shape": (1, world) if first else (world, 1)}),
        "composed inner": ("composed", {"mesh_shape": (world, 1), "seq_parallel": "ring" if first else "allgather"}),
        "hierarchical inner": (
            "hierarchical",
            {"intra_node_size": 1, "inter_node_strategy": "ring" if first else "allgather"},
        ),
        "backend": ("ring" if first else "allgather", {}),
    }
    out = {}
    for case, (name, options) in cases.items():
        if name in mosaic.available_backends():
            out[case] = _outcome(lambda n=name, o=options: _module(n, o)(_input(ctx)))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_different_options_fail_on_every_rank(world: int) -> None:
    _assert_together(run_distributed(_options_differ, world, world), "differ between ranks")


def _init_differs(world: int, what: str) -> dict:
    rank = torch.distributed.get_rank()
    if what == "sp_size":
        return {"init": _outcome(lambda: mosaic.init(sp_size=world if rank == 0 else 1))}
    return {"init": _outcome(lambda: mosaic.init(sp_size=world, collective_timeout=timedelta(seconds=3 + rank)))}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("what", ["sp_size", "collective_timeout"])
def test_init_with_different_arguments_fails_on_every_rank(world: int, what: str) -> None:
    _assert_together(run_distributed(_init_differs, world, world, what), "different arguments on different ranks")


def _reinit(world: int) -> list[float]:
    sums = []
    for _ in range(3):
        ctx = _init(world)
        y = _module("ring", {})(_input(ctx))
        sums.append(round(float(ctx.unshard(y, 1).sum()), 4))
        mosaic.shutdown()
    return sums


def test_shutdown_then_init_again_works() -> None:
    results = run_distributed(_reinit, 2, 2)
    assert all(r == results[0] for r in results) and len(set(results[0])) == 1


def test_failed_init_leaves_no_process_group() -> None:
    """Mosaic starts the process group (a torchrun-like environment), init fails: none is left behind."""
    code = (
        "import torch.distributed as dist, mosaic\n"
        "try:\n    mosaic.init(sp_size=2)\nexcept ValueError as exc:\n    print('raised:', exc)\n"
        "print('initialized:', dist.is_initialized())\n"
    )
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "raised: world_size 1 is not divisible by sp_size 2" in out and "initialized: False" in out, out


# -- a rank that does not join -------------------------------------------------------------------


def _skip_backward(world: int, then: str) -> dict:
    ctx = _init(world)
    out = {}
    for name, options in _strategies(world).items():
        module = _module(name, options)
        x = _input(ctx).requires_grad_()

        def step(m=module, x=x, ctx=ctx):
            y = m(x)
            if ctx.sp_rank != world - 1:
                y.sum().backward()
                ctx.step()
            elif then == "next forward":
                m(x)  # went on to the next step
                ctx.step()
            elif then == "reduce_gradients":
                mosaic.reduce_gradients(m)
            else:
                raise RuntimeError("skipped backward and waited")  # stands for a rank that waits elsewhere

        out[name] = _outcome(step)
        if then == "wait":
            mosaic.shutdown()
            ctx = _init(world)
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_that_skips_backward_then_goes_on_is_caught_within_the_step(world: int) -> None:
    results = run_distributed(_skip_backward, world, world, "next forward")
    # Its next forward's collectives ran on the forward's groups, the others' backward on the backward's:
    # neither side came, and the ranks agreed on what each was doing.
    _assert_together(results, "different sharded calls", "backward", "forward", within=3 * TIMEOUT.total_seconds() + 5)


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_that_skips_backward_makes_the_others_time_out_naming_the_rule(world: int) -> None:
    results = run_distributed(_skip_backward, world, world, "wait", timeout=600)
    for name in results[0]:
        waiting = [r[name] for r in results[: world - 1]]
        assert all(o[0] == "CollectiveTimeout" and "every rank of the sp group must run" in o[1] for o in waiting)
        assert all(o[2] < 3 * TIMEOUT.total_seconds() + 5 for o in waiting), waiting


def _no_grads_reduce(world: int) -> dict:
    ctx = _init(world)
    module = _module("ring", {})
    x = _input(ctx).requires_grad_()
    y = module(x)

    def step():
        if ctx.sp_rank == 0:
            y.sum().backward()
        mosaic.reduce_gradients(module)

    return {"reduce": _outcome(step)}


@pytest.mark.parametrize("world", WORLDS)
def test_reduce_gradients_without_backward_fails_on_every_rank(world: int) -> None:
    results = run_distributed(_no_grads_reduce, world, world)
    # Rank 0's backward waits for the others, who agree at reduce_gradients: they meet there.
    _assert_together([{"reduce": r["reduce"]} for r in results], "different sharded calls", "backward",
                     "reduce_gradients", within=3 * TIMEOUT.total_seconds() + 5)  # fmt: skip


class _Flaky(mosaic.Backend):
    """Fails on the last rank after the guard; the others wait in a data collective."""

    name = "flaky"

    def plan(self, problem):
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class FlakyPlan(mosaic.Plan):
            def __call__(self, q, k, v):
                p = self.problem
                if p.rank == p.size - 1:
                    raise RuntimeError("out of memory (simulated)")
                torch.distributed.all_reduce(q.new_zeros(1), group=p.group)
                return q

        return FlakyPlan(problem, mosaic.Cost())


def _caught_and_alive(world: int) -> dict:
    mosaic.register_backend("flaky", _Flaky, override=True)
    ctx = _init(world)
    try:
        module = _module("flaky", {})
        return {"flaky": _outcome(lambda: module(_input(ctx)))}
    finally:
        mosaic.unregister_backend("flaky")


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_that_fails_inside_a_layer_fails_every_rank_with_its_error(world: int) -> None:
    results = run_distributed(_caught_and_alive, world, world)
    # The others' collective timed out; they met the failing rank at the agreement it had gone to.
    _assert_together(results, "out of memory (simulated)", f"rank(s) [{world - 1}]",
                     within=3 * TIMEOUT.total_seconds() + 5)  # fmt: skip


def _caught_and_went_on(world: int) -> dict:
    """A bad input on one rank at step 1: every rank raises, catches and goes on; later steps stay right."""
    ctx = _init(world)
    module = _module("ring", {})
    outcomes, sums = [], []
    for step in range(3):
        x = _input(ctx)
        if step == 1 and ctx.sp_rank == 1:
            x = x.double()
        try:
            sums.append(float(ctx.unshard(module(x), 1).sum()))
        except TypeError as exc:
            outcomes.append(str(exc))
    return {"sums": sums, "errors": outcomes}


def test_ranks_that_catch_a_shared_error_stay_in_step() -> None:
    results = run_distributed(_caught_and_went_on, 3, 3)
    assert all(len(r["errors"]) == 1 and r["errors"] == results[0]["errors"] for r in results)
    assert all(len(r["sums"]) == 2 and r["sums"][0] == pytest.approx(r["sums"][1]) for r in results)


# -- 2-D grids ------------------------------------------------------------------------------------


def _not_a_grid(world: int) -> dict:
    ctx = _init(world)
    module = mosaic.MultiAxisAttention2D(E, HEADS, 1, 2, (2, world // 2))
    x = ctx.shard(torch.randn(2, 8, 6, E), 1)  # sharded along one dim only
    return {"2-D": _outcome(lambda: module(x))}


@pytest.mark.parametrize("world", [2, 4])
def test_two_d_attention_on_a_tensor_not_sharded_as_a_grid_fails_on_every_rank(world: int) -> None:
    if "mesh2d" not in mosaic.available_backends():
        pytest.skip("MultiAxisAttention2D needs mosaic-mesh2d")
    _assert_together(run_distributed(_not_a_grid, world, world), "not sharded as a", "grid")


# -- reduce_gradients ------------------------------------------------------------------------------


def _missing_grad(world: int) -> list[float]:
    ctx = _init(world)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model(torch.full((1, 4), float(ctx.sp_rank + 1))).sum().backward()
    if ctx.sp_rank == 1:
        model.bias.grad = None
    mosaic.reduce_gradients(model)
    return model.bias.grad.tolist()


@pytest.mark.parametrize("world", WORLDS)
def test_a_missing_gradient_counts_as_zeros(world: int) -> None:
    # Each rank's bias gradient is 1 per output; rank 1 has none: the sum is world - 1.
    assert all(r == [float(world - 1)] * 3 for r in run_distributed(_missing_grad, world, world))


def _reordered(world: int) -> dict:
    _init(world)
    layers = [("a", nn.Linear(4, 4)), ("b", nn.Linear(4, 2))]
    if torch.distributed.get_rank() == 1:
        layers.reverse()
    model = nn.Module()
    for n, layer in layers:
        model.add_module(n, layer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return {"reduce": _outcome(lambda: mosaic.reduce_gradients(model))}


@pytest.mark.parametrize("world", WORLDS)
def test_parameters_in_another_order_fail_on_every_rank(world: int) -> None:
    _assert_together(run_distributed(_reordered, world, world), "models differ")


def _replicas_drift(world: int) -> dict:
    os.environ["MOSAIC_CHECK_REPLICAS"] = "1"
    try:
        ctx = _init(world)
        torch.manual_seed(ctx.sp_rank)  # different weights on every rank
        model = nn.Linear(4, 2)
        model(torch.ones(1, 4)).sum().backward()
        return {"check": _outcome(lambda: mosaic.reduce_gradients(model))}
    finally:
        os.environ.pop("MOSAIC_CHECK_REPLICAS")


def test_the_replica_check_catches_different_weights() -> None:
    _assert_together(run_distributed(_replicas_drift, 2, 2), "copies of the model differ", "weight")


# -- agreement per step: no exchange for a cached plan ----------------------------------------------


def _per_step(world: int) -> dict:
    ctx = _init(world)
    module = _module("ring", {})
    x = _input(ctx).requires_grad_()
    module(x, kv_len=7).sum().backward()  # the first call agrees on its plan; the backward's end on the step
    before = ctx.agreement.rounds
    for _ in range(4):
        module(x, kv_len=7).sum().backward()
    repeated = ctx.agreement.rounds - before
    reference = mosaic.MultiAxisAttention(E, HEADS, 1, sharded=False)
    reference.load_state_dict(module.state_dict())
    exact = float((ctx.unshard(module(x, kv_len=7), 1) - reference(ctx.unshard(x, 1), kv_len=7)).abs().max())
    # One rank alone changes its facts: it agrees again, the others run their cached plan and time out.
    changed = _outcome(lambda: module(x, kv_len=5 if ctx.sp_rank == 0 else 7))
    # Every rank raised and made its groups again: the next steps run.
    again = float(ctx.unshard(module(x, kv_len=7), 1).sum())
    return {"repeated": repeated, "exact": exact, "changed": changed, "again": again}


@pytest.mark.parametrize("world", WORLDS)
def test_a_cached_plan_runs_without_agreement_and_a_change_on_one_rank_fails_every_rank(world: int) -> None:
    results = run_distributed(_per_step, world, world, timeout=600)
    for r in results:
        assert r["repeated"] == 4 and r["exact"] < 1e-5, r  # one agreement per step (the backward's end)
    _assert_together([{"changed": r["changed"]} for r in results], "different sharded calls", "planning",
                     within=3 * TIMEOUT.total_seconds() + 5)  # fmt: skip
    assert len({round(r["again"], 4) for r in results}) == 1


def _retained(world: int) -> list[float]:
    ctx = _init(world)
    out = []
    for name in ("allgather", "ring"):
        if name not in mosaic.available_backends():
            continue
        module = _module(name, {})
        x = _input(ctx).requires_grad_()
        y = module(x).square().sum()
        y.backward(retain_graph=True)
        first = x.grad.clone()
        y.backward()  # a second backward through the same graph
        out.append(float((x.grad - 2 * first).abs().max()))
    return out


def test_a_second_backward_through_a_retained_graph_works() -> None:
    assert all(d < 1e-5 for r in run_distributed(_retained, 2, 2) for d in r)


def _whole_step_skipped(world: int) -> dict:
    """Rank 1 skips step 2 entirely (its forward and backward), as a `continue` in the loop would."""
    ctx = _init(world)
    module = _module("ring", {})
    x = _input(ctx).requires_grad_()

    def loop():
        for step in range(4):
            if step == 2 and ctx.sp_rank == 1:
                continue
            module(x).sum().backward()
            mosaic.reduce_gradients(module)
            ctx.step(step)

    return {"skip": _outcome(loop)}


def test_a_rank_that_skips_a_whole_step_is_named_at_the_step() -> None:
    _assert_together(run_distributed(_whole_step_skipped, 2, 2), "different steps", "rank 0: 2", "rank 1: 3")


def _mistakes(world: int) -> dict:
    """The silent mistakes of the audit: local over sharded q/k/v, a distributed backend over whole q/k/v, a
    distributed layer over the features of a reshape of sharded rows."""
    ctx = _init(world)
    module = _module("ring", {})
    x = _input(ctx, rows=12)  # dim 1 declared sharded: 12 rows over the ranks
    q, k, v = module.project(x)
    out = {"local over sharded": _outcome(lambda: mosaic.attention(q, k, v, backend="local"))}
    whole = torch.randn(2, HEADS, 12, E // HEADS)
    out["ring over whole"] = _outcome(lambda: mosaic.attention(whole, whole, whole, backend="ring", causal=True))
    mha = mosaic.MultiheadAttention(E, HEADS, batch_first=True, backend="ring")
    folded = x.reshape(-1, x.shape[2], E)  # (batch x rows_local, features, embed): features are whole
    out["ring over features"] = _outcome(lambda: mha(folded, folded, folded, need_weights=False))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_declarations_follow_the_data(world: int) -> None:
    results = run_distributed(_mistakes, world, world)
    _assert_together([{"a": r["local over sharded"]} for r in results], "backend='local'", "sharded")
    _assert_together([{"b": r["ring over whole"]} for r in results], "not a dim declared sharded")
    _assert_together([{"c": r["ring over features"]} for r in results], "not a dim declared sharded")


# -- the functional call and the sharded helpers ------------------------------------------------


def _functional_and_helpers(world: int) -> dict:
    ctx = _init(world)
    last = ctx.sp_rank == world - 1
    q = torch.randn(2, HEADS, 5, 4)
    out = {"attention kv_len": _outcome(lambda: mosaic.attention(q, q, q, backend="ring", kv_len=2.5 if last else 3))}
    x = torch.randn(2, 5, 4 if last else 3)
    out["sharded.mean"] = _outcome(lambda: mosaic.sharded.mean(x, 1))
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_functional_attention_and_sharded_helpers_fail_on_every_rank(world: int) -> None:
    results = run_distributed(_functional_and_helpers, world, world)
    _assert_together([{"kv_len": r["attention kv_len"]} for r in results], "kv_len must be an int")
    _assert_together([{"mean": r["sharded.mean"]} for r in results], "partial results differ in shape")


# -- the audit's checks that ran before agreement (one rank raised, the others waited) ------------


def _one_rank_misuses(world: int) -> dict:
    ctx = _init(world)
    last = ctx.sp_rank == world - 1
    module = _module("ring", {})
    x = _input(ctx)
    out = {"explain, bad input": _outcome(lambda: mosaic.explain(module, x[..., : E // 2] if last else x))}
    out["explain, kv_len=3.0"] = _outcome(lambda: mosaic.explain(module, x, kv_len=3.0 if last else 3))
    mha = mosaic.MultiheadAttention(E, HEADS, batch_first=True, backend="ring")
    rows = x[:, :, 0]  # (batch, rows_local, embed), dim 1 sharded
    mask = torch.zeros(rows.shape[:2], dtype=torch.bool) if last else None
    out["key_padding_mask"] = _outcome(lambda: mha(rows, rows, rows, key_padding_mask=mask, need_weights=False))
    module(x).sum().backward()  # planned and agreed: the next call would need no agreement

    def local_on_one_rank():
        if last:
            module.set_backend("local")
        module(x).sum().backward()

    out["set_backend('local')"] = _outcome(local_on_one_rank)
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_misuses_on_one_rank_fail_on_every_rank(world: int) -> None:
    results = run_distributed(_one_rank_misuses, world, world)
    _assert_together([{"a": r["explain, bad input"]} for r in results], "embed size 12", "raised together")
    _assert_together([{"b": r["explain, kv_len=3.0"]} for r in results], "kv_len must be an int, got float")
    _assert_together([{"c": r["key_padding_mask"]} for r in results], "key_padding_mask is not available")
    _assert_together([{"d": r["set_backend('local')"]} for r in results], "different sharded calls", "building",
                     within=3 * TIMEOUT.total_seconds() + 5)  # fmt: skip


def _auto_with_other_rates(world: int) -> dict:
    ctx = _init(world)
    if ctx.sp_rank == world - 1:
        mosaic.cost.set_machine("cpu", mosaic.cost.Machine(flops_per_s=1e9, bytes_per_s=1e15, latency_s=1e-6))
    try:
        return {"auto": _outcome(lambda: _module("auto", {})(_input(ctx)))}
    finally:
        mosaic.cost.set_machine("cpu", None)  # the worker process serves later tests


def test_auto_with_another_machine_model_on_one_rank_fails_on_every_rank() -> None:
    _assert_together(run_distributed(_auto_with_other_rates, 2, 2), "backend='auto' would choose differently",
                     "mosaic.cost.set_machine")  # fmt: skip
