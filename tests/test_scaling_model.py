"""The scaling model's pieces (benchmarks/scaling_model.py): calibration, links, routes, coverage, validation."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mosaic_ring")
pytest.importorskip("mosaic_mesh2d")
pytest.importorskip("mosaic_compose")
pytest.importorskip("mosaic_hier")
pytest.importorskip("mosaic_magi")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling_model as sm

from mosaic.cost import Machine, Pass


@pytest.fixture(scope="module")
def cluster() -> sm.Cluster:
    return sm.default_cluster()


@pytest.fixture(scope="module")
def model() -> sm.StepModel:
    return sm.prediction_model("fa4", checkpoint=False)


def test_one_gpu_prediction_is_the_calibrating_step(model, cluster):
    """At P = 1 and the calibration's rows the model returns the measured one-GPU step, whatever the strategy."""
    step = sm.read_json(sm.TODAY / "bench_train_rows150000_sp1_dp1_allgather_auto.json")
    measured = step["step_time_s"]["median"]
    assert model.one_gpu_seconds(150_000, cluster) == pytest.approx(measured, rel=1e-9)
    for name in ("allgather", "ring", "switch"):
        one = model.predict(name, 150_000, 1, sm.cost_options(name), cluster)
        assert one["step_s"] == pytest.approx(measured, rel=1e-9)
        assert one["memory_gib"] == pytest.approx(max(step["peak_memory_gib"]), rel=1e-9)


def test_kernel_rates_are_read_and_fa4_beats_cudnn():
    rates = sm.today_rates()
    timed = sm.kernel_log_ms(sm.TODAY / "bench_kernels.log")
    # 11 x 4 heads x 150,000 x 75,000 pairs x d 24, 14 FLOPs a pair-dim forward + backward (mosaic.cost).
    flops = 14 * 11 * 4 * 24 * 150_000 * 75_000
    assert rates["fa4"] == pytest.approx(flops / (timed[(sm.ROW_SHAPE, "mosaic_fa4")] / 1e3))
    assert rates["fa4"] > 1.5 * rates["cudnn"]


@pytest.mark.parametrize("pattern", [sm.COLLECTIVE, sm.P2P, sm.ALL_TO_ALL])
@pytest.mark.parametrize("ranks", [range(4), range(32), range(0, 64, 8)])
def test_transfers_grow_with_bytes_and_shrink_with_bandwidth(cluster, pattern, ranks):
    group = sm.group_of(ranks, cluster.gpus_per_node)
    small, large = (sm.transfer_seconds(n, group, pattern, cluster) for n in (1e8, 4e8))
    assert 0 < small < large == pytest.approx(4 * small)
    faster = dataclasses.replace(cluster, nvlink_bytes_per_s=2 * cluster.nvlink_bytes_per_s,
                                 nic_bytes_per_s=2 * cluster.nic_bytes_per_s)  # fmt: skip
    assert sm.transfer_seconds(1e8, group, pattern, faster) == pytest.approx(small / 2)


def test_crossing_nodes_is_slower_and_a_flat_ring_waits_for_one_nic(cluster):
    in_node, across = sm.group_of(range(8), 8), sm.group_of(range(16), 8)
    assert across.nodes == 2 and across.per_node == 8
    inside = sm.transfer_seconds(1e9, in_node, sm.P2P, cluster)
    for pattern in (sm.P2P, sm.ALL_TO_ALL):
        assert sm.transfer_seconds(1e9, across, pattern, cluster) > inside
    # NCCL's rings use a node's 8 NICs (400 GB/s), more than NVLink gives: a full-node collective is NVLink-bound.
    assert sm.transfer_seconds(1e9, across, sm.COLLECTIVE, cluster) == pytest.approx(inside)
    half = sm.group_of(range(0, 32, 4), 8)  # 2 ranks per node: 2 NICs
    assert sm.transfer_seconds(1e9, half, sm.COLLECTIVE, cluster) == pytest.approx(1e9 / (2 * cluster.nic_bytes_per_s))
    assert sm.transfer_seconds(1e9, across, sm.P2P, cluster) == pytest.approx(1e9 / cluster.nic_bytes_per_s)
    rail = sm.group_of(range(0, 64, 8), 8)
    assert rail.per_node == 1 and rail.nodes == 8
    assert sm.transfer_seconds(1e9, rail, sm.COLLECTIVE, cluster) == pytest.approx(1e9 / cluster.nic_bytes_per_s)


@pytest.mark.parametrize("hidden", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("nbytes", [1e8, 1e11])
def test_one_link_without_tax_is_mosaics_machine(cluster, hidden, nbytes):
    """With one group in a node, no hop latency and no overlap tax, a pass costs what auto's Machine says."""
    plain = dataclasses.replace(cluster, overlap_tax=0.0, hop_intra_s=0.0)
    step = Pass(flops=3e13, bytes=nbytes, hidden=hidden, collectives=3)
    legs = [sm.Leg(1.0, hidden, sm.group_of(range(4), 8), sm.P2P)]
    machine = Machine(flops_per_s=2e14, bytes_per_s=plain.nvlink_bytes_per_s, latency_s=plain.launch_s)
    assert sm.pass_seconds(step, legs, 2e14, plain).total == pytest.approx(machine.pass_seconds(step))


def test_overlap_tax_charges_hidden_transfers(cluster):
    legs = [sm.Leg(1.0, 1.0, sm.group_of(range(4), 8), sm.P2P)]
    step = Pass(flops=2e14, bytes=1e10, hidden=1.0)  # 1 s of compute hides 37 ms of transfer
    free = sm.pass_seconds(step, legs, 2e14, dataclasses.replace(cluster, overlap_tax=0.0))
    taxed = sm.pass_seconds(step, legs, 2e14, dataclasses.replace(cluster, overlap_tax=1.0))
    assert free.comm == 0.0
    assert taxed.comm == pytest.approx(1e10 / cluster.nvlink_bytes_per_s)


def test_routes_split_the_estimates_bytes(model):
    """Every route's shares add up to the estimate's bytes; the hierarchy sends (nodes-1)/(P-1) over its rail."""
    import mosaic
    from mosaic_compose import ComposedOptions
    from mosaic_hier import HierOptions
    from mosaic_mesh2d import Mesh2DOptions

    size = 32
    cases = {
        "ring": sm.cost_options("ring"),
        "mesh2d": Mesh2DOptions((4, 8)),
        "composed": ComposedOptions((4, 8), seq_parallel="allgather"),
        "hierarchical": HierOptions(8, "ring", "allgather"),
    }
    legs = {}
    for name, options in cases.items():
        problem = model.shape.problem(10**6, size, options)
        legs[name] = sm.routes(name, problem, mosaic.get_backend(name).estimate(problem), 8)
        for step in legs[name]:
            assert sum(leg.share for leg in step) == pytest.approx(1.0)
    rail, node = legs["hierarchical"][0]
    assert rail.share == pytest.approx((size // 8 - 1) / (size - 1)) and rail.group.per_node == 1
    assert node.group.nodes == 1 and node.pattern == sm.COLLECTIVE and rail.pattern == sm.P2P
    exchange, inner = legs["composed"][0]
    assert exchange.group.nodes == 1 and exchange.hidden == 0.0 and inner.group.nodes == 4


def test_comm_grows_with_rows_and_shrinks_with_the_nic(model, cluster):
    ring = sm.cost_options("ring")
    small, large = (model.predict("ring", rows, 16, ring, cluster)["comm_s_per_layer"] for rows in (10**6, 10**7))
    assert 0 < small < large
    fast = dataclasses.replace(cluster, nic_bytes_per_s=4 * cluster.nic_bytes_per_s)
    assert model.predict("ring", 10**6, 16, ring, fast)["comm_s_per_layer"] < small
    # Ring memory is O(N/P): 16x the GPUs, about 1/16 of the memory.
    few, many = (model.predict("ring", 10**7, p, ring, cluster)["memory_gib"] for p in (16, 256))
    assert many == pytest.approx(few / 16, rel=0.05)


def test_every_strategy_is_priced_or_skipped_with_a_reason(model, cluster):
    found = sm.predict_all(model, cluster, [10**6], [2, 16])
    for size in (2, 16):
        for name in sm.STRATEGIES:
            priced = [p for p in found["predictions"] if p["P"] == size and p["strategy"] == name]
            skipped = [s for s in found["skipped"] if s["P"] == size and s["strategy"] == name]
            assert priced or skipped, (name, size)
            assert all(s["reasons"] and all(isinstance(r, str) and r for r in s["reasons"]) for s in skipped)
            assert all(math.isfinite(p["step_s"]) and p["step_s"] > 0 for p in priced)
    reasons = {(s["strategy"], s["P"]): s["reasons"][0] for s in found["skipped"]}
    assert "kv_len" in reasons[("ring_flash_attn", 16)]
    assert "divisible" in reasons[("ulysses", 16)]
    assert any(p["strategy"] == "hierarchical" and p["P"] == 16 for p in found["predictions"])
    assert "one node" in reasons[("hierarchical", 2)]
    best = sm.winners(found["predictions"], {10**6: model.one_gpu_seconds(10**6, cluster)})
    assert {w["P"] for w in best} == {2, 16} and all(0 < w["efficiency"] <= 1.01 for w in best)


def test_validation_returns_per_row_errors(cluster):
    result = sm.run_validation(cluster)
    rows = result["rows"]
    assert len(rows) == result["total"] > 50
    for r in rows:
        assert r["error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
        assert r["within_target"] == (abs(r["error"]) <= sm.TARGET)
    assert {r["P"] for r in rows} == {2, 4}
    steps = [r for r in rows if r["case"].startswith("nanoTabPFN") and r["unit"] == "s"]
    assert len(steps) == 3 and all(abs(r["error"]) < sm.TARGET for r in steps)


def test_the_fitted_overlap_tax_is_what_the_fit_gives(cluster):
    assert sm.fit_overlap_tax(cluster, sm.bench_cases([sm.FIT_ON])) == sm.FITTED_OVERLAP_TAX


def test_problems_are_built_like_mosaics(model):
    problem = model.shape.problem(10**6, 8, sm.cost_options("ring"))
    assert (problem.batch, problem.heads, problem.head_dim, problem.kv_len) == (11, 4, 24, 500_000)
    assert problem.batch_shape == (1, 11) and problem.dtype == torch.bfloat16 and problem.device.type == "cuda"
    assert problem.q_layout.lengths == (125_000,) * 8
