"""ulysses against local on the unsharded tensor, its communication volume, and its errors."""

from __future__ import annotations

import pytest
import torch

import mosaic
from mosaic.comm import count_traffic
from mosaic.layout import SeqLayout
from mosaic.problem import AttentionProblem
from mosaic.testing import compare_with_local, make_problem, run_distributed
from mosaic_compose import HeadExchange, UlyssesBackend

TOL = 1e-5

# (name, shape, attention_axis, extra kwargs); 4 heads of dim 4 unless given.
CASES = [
    ("self axis1", (2, 12, 3, 16), 1, {}),
    ("self axis2", (2, 3, 12, 16), 2, {}),
    ("uneven", (2, 11, 3, 16), 1, {}),
    ("fewer rows than ranks", (2, 3, 2, 16), 1, {"causal": True}),
    ("kv_len", (2, 13, 3, 16), 1, {"kv_len": 6}),
    ("kv_len one", (1, 9, 2, 16), 1, {"kv_len": 1}),
    ("cross kv_len", (2, 10, 3, 16), 1, {"kv_length": 9, "kv_len": 5}),
    ("gqa", (2, 12, 2, 32), 1, {"num_heads": 8, "num_kv_heads": 4}),
    ("gqa cross", (1, 10, 2, 32), 1, {"num_heads": 8, "num_kv_heads": 4, "kv_length": 7}),
    ("causal uneven", (1, 11, 2, 16), 1, {"causal": True}),
    ("causal zigzag uneven", (1, 13, 2, 16), 1, {"causal": True, "layout": "zigzag"}),
    ("causal kv_len zigzag", (1, 14, 2, 16), 1, {"causal": True, "layout": "zigzag", "kv_len": 9}),
    ("5-D axis 3", (2, 2, 3, 10, 16), 3, {}),
]


def _all_cases(world: int) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=world)
    return {name: compare_with_local("ulysses", shape, axis, **kw) for name, shape, axis, kw in CASES}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_local(world: int) -> None:
    results = run_distributed(_all_cases, world, world)
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"ulysses P={world} rank {rank} {name}: {errors}"


def _forward_traffic(kv_len: int | None) -> int:
    ctx = mosaic.init(sp_size=4)
    module = mosaic.MultiAxisAttention(16, 4, 1, backend="ulysses")
    x = ctx.shard(torch.randn(2, 16, 16), 1)
    with count_traffic() as meter, torch.no_grad():
        module(x, kv_len=kv_len)
    return meter.total


@pytest.mark.parametrize("kv_len", [None, 8])
def test_forward_traffic(kv_len: int | None) -> None:
    # P = 4, batch 2, N = 16 (4 rows a rank), H = 4, d = 4, fp32: each all-to-all
    # brings (P - 1) foreign rows (or kept key rows) of one head.
    row = 2 * 1 * 4 * 4  # batch x heads/P x head_dim x bytes
    if kv_len is None:
        expected = [3 * 4 * row * 3 + 3 * 4 * row] * 4  # q, k, v in one all-to-all; the output back
    else:
        # Keys below 8 sit on ranks 0 and 1: each rank receives those the other ranks hold.
        kv_in = [4 * 2 * row, 4 * 2 * row, 8 * 2 * row, 8 * 2 * row]
        expected = [3 * 4 * row * 2 + kv for kv in kv_in]
    assert run_distributed(_forward_traffic, 4, kv_len) == expected


def _problem(heads: int, kv_heads: int, size: int) -> AttentionProblem:
    return make_problem(size=size, heads=heads, kv_heads=kv_heads)


def test_heads_must_divide_by_the_group() -> None:
    backend = UlyssesBackend()
    assert backend.not_supported_reasons(_problem(8, 4, 4)) == []
    (reason,) = backend.not_supported_reasons(_problem(6, 6, 4))
    assert "heads 6 and kv heads 6 not divisible by the 4 ranks" in reason
    assert "backend='composed' with mesh_shape=(h, s)" in reason
    (reason,) = backend.not_supported_reasons(_problem(8, 2, 4))
    assert "kv heads 2 not divisible" in reason and "heads 8" not in reason


def test_exchange_positions_are_the_sorted_union() -> None:
    # Zigzag over 2 ranks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2; together, everything.
    layout = SeqLayout.even(8, 2, "zigzag")
    exchange = HeadExchange(None, 0, [layout.spans(0), layout.spans(1)])
    assert exchange.positions == ((0, 8),)
    assert exchange.rows == [4, 4]
    uneven = HeadExchange(None, 0, [((4, 7),), (), ((0, 2), (9, 10))])
    assert uneven.positions == ((0, 2), (4, 7), (9, 10))
    assert uneven.rows == [3, 0, 3]


def test_conformance_kit() -> None:
    """The standard cases it declares (heads split over the ranks: not 'fewer heads than ranks' at P = 4)."""
    results = mosaic.testing.run_conformance("ulysses", world_sizes=(2, 4))
    skipped = mosaic.testing.cases_for("ulysses", 4)[1]
    assert set(skipped) == {"fewer heads than ranks", "one kv head", "grouped kv heads"}, skipped
    assert len(results[4]) == len(mosaic.testing.STANDARD_CASES) - len(skipped)
