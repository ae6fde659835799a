"""switch against local on the unsharded tensor, its measured communication, its plan, options and reasons."""

from __future__ import annotations

import pytest
import torch

import mosaic
from mosaic.auto import AutoOptions, rank
from mosaic.comm import count_traffic
from mosaic.layout import SeqLayout
from mosaic.testing import STANDARD_CASES, compare_with_local, make_problem, run_conformance, run_distributed
from mosaic_compose import SwitchBackend, UlyssesBackend
from mosaic_compose.switch import batch_split, switch_traffic

TOL = 1e-5


def test_conformance() -> None:
    """Every standard case at P = 1..4: switch declares all of them, and all match local."""
    found = run_conformance("switch", world_sizes=(1, 2, 3, 4))
    for world, per_case in found.items():
        assert set(per_case) == {c.name for c in STANDARD_CASES}, f"P={world} skipped cases"


def test_conformance_eight_ranks() -> None:
    """P = 8: more ranks than batch entries (idle ranks), than rows, than heads."""
    names = {"5-D", "fewer rows than ranks (empty shards)", "kv_len inside a shard", "causal, zigzag",
             "grouped kv heads", "fewer heads than ranks", "cross-attention with kv_len"}  # fmt: skip
    cases = [c for c in STANDARD_CASES if c.name in names]
    assert len(cases) == len(names)
    found = run_conformance("switch", world_sizes=(8,), cases=cases)
    assert set(found[8]) == names


# (name, shape, attention_axis, kwargs): what conformance does not single out.
SWITCH_CASES = [
    ("batch' 1", (1, 10, 16), 1, {}),
    ("batch' 1, causal, kv_len", (1, 11, 16), 1, {"causal": True, "kv_len": 7}),
    ("batch' 2 < P, MQA, zigzag causal", (2, 13, 16), 1, {"causal": True, "layout": "zigzag", "num_kv_heads": 1}),
    ("zigzag kv_len GQA", (2, 17, 3, 16), 1, {"causal": True, "layout": "zigzag", "kv_len": 10, "num_kv_heads": 2}),
    ("zigzag causal cross", (2, 12, 2, 16), 1, {"causal": True, "layout": "zigzag", "kv_length": 17, "kv_len": 15}),
    ("3 heads, 1 kv head", (3, 9, 2, 24), 1, {"num_heads": 3, "num_kv_heads": 1}),
    ("dims (1,) of a 5-D tensor", (2, 3, 7, 5, 16), 2, {"backend_options": {"dims": (1,)}}),
    ("dims (0, 2) of a 5-D tensor, causal", (2, 3, 7, 5, 16), 2, {"backend_options": {"dims": (0, 2)}, "causal": True}),
    ("dims (-1,) of a 5-D tensor, kv_len", (2, 3, 5, 9, 16), 3, {"backend_options": {"dims": (-1,)}, "kv_len": 4}),
    ("dims (0,), batch dim 1", (1, 3, 7, 5, 16), 2, {"backend_options": {"dims": (0,)}}),
]


def _switch_cases(world: int) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=world)
    return {name: compare_with_local("switch", shape, axis, **kw) for name, shape, axis, kw in SWITCH_CASES}


@pytest.mark.parametrize("world", [3, 4])
def test_switch_cases_match_local(world: int) -> None:
    results = run_distributed(_switch_cases, world, world)
    for rank_, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"switch P={world} rank {rank_} {name}: {errors}"


def _dtypes(world: int) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=world)
    shape, kw = (3, 12, 2, 32), {"causal": True, "kv_len": 9, "num_kv_heads": 2}
    return {
        "fp64": compare_with_local("switch", shape, 1, dtype=torch.float64, **kw),
        "bf16": compare_with_local("switch", shape, 1, dtype=torch.bfloat16, reference_dtype=torch.float32, **kw),
    }


def test_dtypes() -> None:
    """fp64 is exact to fp64 rounding; bf16 errs no more than local in bf16 does (same kernels, same rows)."""
    (errors, *_) = run_distributed(_dtypes, 4, 4)
    assert max(errors["fp64"].values()) < 1e-12, errors["fp64"]
    bf16 = errors["bf16"]
    for key in ("out", "dx", "params"):
        assert bf16[key] <= 1.5 * bf16[f"local_{key}"] + 1e-3, bf16


# (name, shape, attention_axis, kwargs) for the traffic count; embed 16.
TRAFFIC = [
    ("even", (4, 16, 16), 1, {}),
    ("uneven, batch' < P, kv_len", (1, 13, 3, 16), 1, {"kv_len": 5}),
    ("zigzag causal GQA", (2, 16, 3, 16), 1, {"causal": True, "layout": "zigzag", "num_kv_heads": 2}),
    ("cross, kv_len, MQA", (3, 10, 16), 1, {"kv_length": 14, "kv_len": 9, "num_kv_heads": 1}),
    ("dims (1,) of a 5-D tensor", (2, 3, 9, 5, 16), 2, {"dims": (1,)}),
]


def _measured_traffic(world: int) -> dict[str, tuple[int, int]]:
    ctx = mosaic.init(sp_size=world)
    torch.manual_seed(0)
    out = {}
    for name, shape, axis, kw in TRAFFIC:
        kw = dict(kw)
        options = {"dims": kw.pop("dims")} if "dims" in kw else None
        layout, kv_length = kw.pop("layout", "contiguous"), kw.pop("kv_length", None)
        module = mosaic.MultiAxisAttention(16, 4, axis, backend="switch", num_kv_heads=kw.pop("num_kv_heads", None),
                                           layout=layout, backend_options=options)  # fmt: skip
        x = ctx.shard(torch.randn(shape), axis, layout).requires_grad_()
        kv = None
        if kv_length is not None:
            kv_shape = (*shape[:axis], kv_length, *shape[axis + 1 :])
            kv = ctx.shard(torch.randn(kv_shape), axis, layout).requires_grad_()
        with count_traffic() as forward:
            y = module(x, kv, **kw)
        with count_traffic() as backward:
            y.backward(torch.randn_like(y))
        out[name] = (forward.total, backward.total)
    return out


def _expected_traffic(world: int, r: int, shape, axis: int, kw: dict) -> tuple[int, int]:
    heads, kv_heads = 4, kw.get("num_kv_heads") or 4
    layout = kw.get("layout", "contiguous")
    length = shape[axis]
    kv_length = kw.get("kv_length") or length
    batch_shape = tuple(n for i, n in enumerate(shape[:-1]) if i != axis)
    options = {"dims": kw["dims"]} if "dims" in kw else None
    problem = make_problem(
        size=world, rank=r, heads=heads, kv_heads=kv_heads, head_dim=shape[-1] // heads, backend="switch",
        options=options, batch=int(torch.tensor(batch_shape).prod()), batch_shape=batch_shape,
        q_layout=SeqLayout.even(length, world, layout), kv_layout=SeqLayout.even(kv_length, world, layout),
        causal=kw.get("causal", False), kv_len=kw.get("kv_len"), cross="kv_length" in kw,
    )  # fmt: skip
    return switch_traffic(problem)


@pytest.mark.parametrize("world", [3, 4])
def test_measured_traffic_is_the_closed_form(world: int) -> None:
    measured = run_distributed(_measured_traffic, world, world)
    for name, shape, axis, kw in TRAFFIC:
        for r in range(world):
            assert measured[r][name] == _expected_traffic(world, r, shape, axis, kw), f"P={world} rank {r} {name}"
    # By hand, evenly split (batch' 4, N 16, H = Hkv = 4, d 4, fp32): each direction moves 2 (P-1)/P^2 of
    # batch' x (H N + Hkv N) x d elements to every rank: q, k, v in and the output back, then dout in and dq,
    # dk, dv back.
    if world == 4:
        each = 2 * 3 * 4 * (4 * 16 + 4 * 16) * 4 * 4 // 16
        assert all(measured[r]["even"] == (each, each) for r in range(world))


def test_plan_split_and_cost() -> None:
    """dims picks what is split; the cost's bytes are the busiest rank's closed form."""
    problem = make_problem(size=2, backend="switch", options={"dims": (1,)}, batch=30, batch_shape=(2, 3, 5))
    split = batch_split(problem)
    assert (split.shape, split.order, split.parts, split.kept) == ((2, 3, 5), (1, 0, 2), (2, 1), 10)
    default = batch_split(make_problem(size=4, backend="switch", batch=6, batch_shape=(2, 3)))
    assert (default.parts, default.kept) == ((2, 2, 1, 1), 1)
    t = torch.arange(30 * 2 * 1 * 3).view(30, 2, 1, 3).float()
    grouped = split.regroup(t)
    assert grouped.shape == (3, 10, 2, 1, 3)
    assert torch.equal(grouped[2, 7], t.view(2, 3, 5, 2, 1, 3)[1, 2, 2])  # kept index 7 = (1, 2) of (2, 5)
    assert torch.equal(split.ungroup(grouped), t)

    p = make_problem(size=3, heads=2, kv_heads=1, length=10, backend="switch", batch=4, kv_len=7, causal=True)
    plan = SwitchBackend().plan(p)
    assert plan.cost.bytes == max(sum(switch_traffic(p, r)) for r in range(3))
    assert plan.cost.collectives == 4
    # Rank 0 holds 2 of the 4 batch entries: it computes every visible pair of both sequences.
    assert plan.cost.flops == 14.0 * 2 * 2 * 8 * sum(p.pairs(r) for r in range(3))


def test_auto_picks_switch_for_many_short_sequences() -> None:
    """On the H200 rates: TabPFN-like row attention (batch' 2000, 512 rows, 4 heads of 24) -> switch;
    one long sequence (batch' 1 < P: three ranks would idle) -> not switch."""
    candidates = AutoOptions(candidates=("ring", "allgather", "switch"))
    cuda = {"device": torch.device("cuda"), "dtype": torch.bfloat16, "size": 4}
    short = make_problem(heads=4, head_dim=24, length=512, batch=2000, **cuda)
    assert rank(short, candidates).chosen.backend == "switch", str(rank(short, candidates))
    long = make_problem(heads=16, head_dim=128, length=65536, batch=1, **cuda)
    assert rank(long, candidates).chosen.backend != "switch", str(rank(long, candidates))


def test_options_are_checked_when_the_module_is_built() -> None:
    with pytest.raises(ValueError, match=r"backend 'switch' has no option 'dim' \(its options: dims\)"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="switch", backend_options={"dim": (0,)})
    for bad, message in [
        ((), r"option dims must name at least one folded dim"),
        ((0, 0), r"option dims names a dim twice: \(0, 0\)"),
        ("0", r"option dims must be a tuple of ints"),
        ((True,), r"option dims must be a tuple of ints"),
        ((0.5,), r"option dims must be a tuple of ints"),
    ]:
        with pytest.raises(ValueError, match=message):
            mosaic.MultiAxisAttention(16, 4, 1, backend="switch", backend_options={"dims": bad})
    module = mosaic.MultiAxisAttention(16, 4, 1, backend="switch", backend_options={"dims": [0, -1]})
    assert module.options.dims == (0, -1)  # a tuple: options are hashed into the plan cache
    hash(module.options)


def test_not_supported_reasons() -> None:
    backend = SwitchBackend()
    # Heads need not divide the group: what ulysses refuses, switch runs.
    odd = make_problem(size=4, heads=3, kv_heads=1, backend="switch", batch=5)
    assert backend.not_supported_reasons(odd) == []
    assert UlyssesBackend().not_supported_reasons(make_problem(size=4, heads=3, kv_heads=1, batch=5))
    assert backend.not_supported_reasons(make_problem(size=8, backend="switch", batch=1, causal=True)) == []

    def reasons(dims, batch_shape, batch=None):
        batch = batch or int(torch.tensor(batch_shape or (1,)).prod())
        problem = make_problem(size=2, backend="switch", options={"dims": dims}, batch=batch, batch_shape=batch_shape)
        return backend.not_supported_reasons(problem)

    assert reasons((1,), (2, 3)) == [] and reasons((-2,), (2, 3)) == []
    (reason,) = reasons((2,), (2, 3))
    assert "option dims=(2,): [2] out of range for the 2 folded dims (2, 3)" in reason
    (reason,) = reasons((0, -2), (2, 3))
    assert "names one of the folded dims (2, 3) twice" in reason
    (reason,) = reasons((0,), (), batch=6)
    assert "needs the folded batch shape, but this call gives () for batch' 6" in reason
    assert reasons(None, (), batch=6) == []  # all of batch' needs no batch shape
    with pytest.raises(mosaic.BackendNotSupported, match="out of range"):
        backend.check(make_problem(size=2, backend="switch", options={"dims": (3,)}, batch=6, batch_shape=(2, 3)))
