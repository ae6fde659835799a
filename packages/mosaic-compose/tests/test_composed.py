"""composed (ComposedAttention) against local on the unsharded tensor, and its errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch.nn as nn

import mosaic
from mosaic.layout import SeqLayout
from mosaic.problem import AttentionProblem
from mosaic.testing import compare_with_local, make_problem, run_distributed
from mosaic_compose import ComposedAttention, ComposedBackend
from mosaic_compose.exchange import merge_spans

TOL = 1e-5

# (name, shape, attention_axis, extra kwargs); 4 heads of dim 4 unless given, so h = 4 leaves one a rank.
CASES = [
    ("self", (2, 12, 2, 16), 1, {}),
    ("uneven axis2", (2, 3, 13, 16), 2, {}),
    ("fewer rows than ranks", (1, 3, 2, 16), 1, {"causal": True}),
    ("kv_len", (2, 13, 2, 16), 1, {"kv_len": 4}),
    ("cross kv_len", (1, 10, 3, 16), 1, {"kv_length": 9, "kv_len": 5}),
    ("gqa", (2, 12, 2, 32), 1, {"num_heads": 8, "num_kv_heads": 4}),
    ("causal", (1, 11, 2, 16), 1, {"causal": True}),
    ("causal zigzag uneven", (1, 13, 2, 16), 1, {"causal": True, "layout": "zigzag"}),
    ("causal kv_len zigzag", (1, 18, 2, 16), 1, {"causal": True, "layout": "zigzag", "kv_len": 11}),
]
# Fewer, for 8 processes on a small CPU.
CASES_8 = [CASES[i] for i in (1, 2, 3, 5, 7)]

# (label, mesh_shape, backend options) run on 4 processes.
CONFIGS_4 = [
    ("(2,2) ring", (2, 2), {}),
    ("(2,2) allgather", (2, 2), {"seq_parallel": "allgather"}),
    ("(1,4) ring", (1, 4), {"seq_parallel": "ring"}),
    ("(4,1) local", (4, 1), {"seq_parallel": "local"}),
    ("(2,2) ring, no head parallel", (2, 2), {"head_parallel": False}),
]
CONFIGS_MESH2D = [
    ("(2,2) mesh2d (1,2)", (2, 2), {"seq_parallel": "mesh2d", "seq_mesh_shape": (1, 2)}),
    ("(2,2) mesh2d (2,1)", (2, 2), {"seq_parallel": "mesh2d", "seq_mesh_shape": (2, 1)}),
    ("(2,2) mesh2d (2,2), no head parallel", (2, 2), {"head_parallel": False, "seq_parallel": "mesh2d",
                                                       "seq_mesh_shape": (2, 2)}),
]  # fmt: skip


def _run(configs: list, cases: list, sp_size: int) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=sp_size)
    out = {}
    for label, mesh_shape, options in configs:
        for name, shape, axis, kw in cases:
            errors = compare_with_local("composed", shape, axis, mesh_shape=mesh_shape, backend_options=options, **kw)
            out[f"{label} {name}"] = errors
    return out


def _assert_close(results: list[dict[str, dict[str, float]]]) -> None:
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"rank {rank} {name}: {errors}"


def test_matches_local_on_4() -> None:
    _assert_close(run_distributed(_run, 4, CONFIGS_4, CASES, 4))


@pytest.mark.skipif("mesh2d" not in mosaic.available_backends(), reason="mosaic-mesh2d is not installed")
def test_mesh2d_inner_matches_local_on_4() -> None:
    _assert_close(run_distributed(_run, 4, CONFIGS_MESH2D, CASES, 4))


def _run_8() -> dict[str, dict[str, float]]:
    out = {f"sp 8 {k}": v for k, v in _run([("(2,4) ring", (2, 4), {})], CASES_8, 8).items()}
    mosaic.shutdown()
    # Two data-parallel replicas of a (2, 2) composition.
    out.update({f"dp 2 {k}": v for k, v in _run([("(2,2) ring", (2, 2), {})], CASES_8, 4).items()})
    return out


def test_matches_local_on_8() -> None:
    _assert_close(run_distributed(_run_8, 8))


def _problem(heads: int, kv_heads: int, size: int, mesh_shape: Any, **options: Any) -> AttentionProblem:
    options = {"mesh_shape": mesh_shape, **options}
    return make_problem(size=size, heads=heads, kv_heads=kv_heads, backend="composed", options=options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "backend 'composed' needs option.s. mesh_shape"),
        ({"mesh_shape": (2, 2, 1)}, r"mesh_shape must be 2 positive ints, got \(2, 2, 1\)"),
        ({"mesh_shape": (2, 2), "seq_parallel": "nope"}, "seq_parallel='nope': unknown backend 'nope'"),
        ({"mesh_shape": (2, 2), "seq_parallel": "composed"}, "would nest the composition in itself"),
        ({"mesh_shape": (2, 2), "head_parallel": "yes"}, "head_parallel must be a bool, got 'yes'"),
        (
            {"mesh_shape": (2, 2), "seq_parallel": "allgather", "seq_options": {"chunk": 2}},
            r"backend 'allgather' has no option 'chunk'",
        ),
    ],
)
def test_bad_options_fail_when_the_module_is_built(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mosaic.MultiAxisAttention(16, 4, 1, backend="composed", backend_options=options)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        (_problem(4, 4, 4, (2, 4)), "mesh_shape (2, 4) has 8 ranks but the sp group has 4"),
        (_problem(6, 6, 4, (4, 1)), "heads 6 and kv heads 6 not divisible by the 4 ranks of the head axis (h = 4"),
        (_problem(6, 6, 4, (4, 1)), "choose an h that divides both head counts, or head_parallel=False"),
        (_problem(4, 1, 4, (2, 2)), "kv heads 1 not divisible by the 2 ranks of the head axis"),
        (_problem(4, 4, 4, (2, 2), seq_parallel="local"), "seq_parallel='local' attends within one rank"),
    ],
)
def test_reasons(problem: AttentionProblem, message: str) -> None:
    reasons = ComposedBackend().not_supported_reasons(problem)
    assert any(message in r for r in reasons), reasons


def test_valid_problems_have_no_reasons() -> None:
    backend = ComposedBackend()
    assert backend.not_supported_reasons(_problem(4, 2, 4, (2, 2))) == []
    assert backend.not_supported_reasons(_problem(4, 4, 4, (4, 1), seq_parallel="local")) == []
    # Without head parallelism the head counts need not divide by h.
    assert backend.not_supported_reasons(_problem(3, 3, 4, (2, 2), head_parallel=False)) == []


@pytest.mark.skipif("mesh2d" not in mosaic.available_backends(), reason="mosaic-mesh2d is not installed")
def test_mesh2d_inner_needs_its_mesh_shape() -> None:
    with pytest.raises(ValueError, match=r"backend 'mesh2d' needs option\(s\) mesh_shape"):
        _problem(4, 4, 8, (2, 4), seq_parallel="mesh2d")
    backend = ComposedBackend()
    (reason,) = backend.not_supported_reasons(_problem(4, 4, 8, (2, 4), seq_parallel="mesh2d", seq_mesh_shape=(2, 1)))
    assert reason.startswith("seq_parallel='mesh2d': mesh_shape (2, 1) has 2 ranks")
    assert backend.not_supported_reasons(_problem(4, 4, 8, (2, 4), seq_parallel="mesh2d", seq_mesh_shape=(2, 2))) == []


def test_composed_attention_is_a_configured_multi_axis_attention() -> None:
    attn = ComposedAttention((2, 4), seq_parallel="allgather", embed_dim=16, num_heads=4, attention_axis=1)
    assert mosaic.ComposedAttention is ComposedAttention
    assert isinstance(attn, mosaic.MultiAxisAttention)
    assert attn.backend_name == "composed" and attn.mesh_shape == (2, 4)
    assert attn.backend_options == {
        "mesh_shape": (2, 4), "head_parallel": True, "seq_parallel": "allgather", "seq_mesh_shape": None,
        "seq_options": (),
    }  # fmt: skip
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    attn.load_state_dict(mha.state_dict())
    with pytest.raises(ValueError, match=r"mesh_shape must be 2 positive ints, got \(8,\)"):
        ComposedAttention((8,), embed_dim=16, num_heads=4, attention_axis=1)


@pytest.mark.parametrize(("total", "exact"), [(16, True), (13, False)])
def test_zigzag_head_groups_hold_the_zigzag_layout_of_the_seq_axis(total: int, exact: bool) -> None:
    from mosaic_compose.composed import _inner_problem

    outer = SeqLayout.even(total, 4, "zigzag")
    p = dataclasses.replace(_problem(4, 4, 4, (2, 2)), q_layout=outer, kv_layout=outer)
    inner = _inner_problem(p, p.options)
    zigzag = SeqLayout.even(total, 2, "zigzag")
    assert inner.q_layout.kind == "zigzag" and inner.size == 2 and inner.heads == 2
    got = [inner.q_layout.spans(c) for c in range(2)]
    assert (got == [merge_spans(list(zigzag.spans(c))) for c in range(2)]) is exact
    # Uneven lengths shift the chunk boundaries by fewer than h = 2 rows.
    assert all(abs(a - b) < 2 for a, b in zip(inner.q_layout.lengths, zigzag.lengths, strict=True))


def test_conformance_kit() -> None:
    """The standard cases on (h, s) = (2, 2) over a ring."""
    results = mosaic.testing.run_conformance("composed", world_sizes=(4,), options={"mesh_shape": (2, 2)})
    assert results[4]
