"""ring and allgather against local on the unsharded tensor: outputs, input and parameter gradients."""

from __future__ import annotations

import pytest

import mosaic
from mosaic.testing import compare_with_local, run_distributed

TOL = 1e-5

# (name, shape, attention_axis, extra kwargs); shapes use embed 16 and 4 heads.
CASES = [
    ("self axis1", (2, 12, 3, 16), 1, {}),
    ("self axis2", (2, 3, 12, 16), 2, {}),
    ("uneven", (2, 11, 3, 16), 1, {}),
    ("kv_len", (2, 13, 3, 16), 1, {"kv_len": 6}),
    ("kv_len one", (1, 9, 2, 16), 1, {"kv_len": 1}),
    ("cross", (2, 10, 3, 16), 1, {"kv_length": 7}),
    ("cross kv_len", (2, 10, 3, 16), 1, {"kv_length": 9, "kv_len": 5}),
    ("gqa", (2, 12, 3, 16), 1, {"num_kv_heads": 2}),
    ("mqa axis2", (2, 3, 12, 16), 2, {"num_kv_heads": 1}),
    ("causal", (2, 12, 3, 16), 1, {"causal": True}),
    ("causal uneven", (1, 11, 2, 16), 1, {"causal": True}),
    ("causal zigzag", (2, 16, 2, 16), 1, {"causal": True, "layout": "zigzag"}),
    ("causal zigzag uneven", (1, 13, 2, 16), 1, {"causal": True, "layout": "zigzag"}),
    ("causal kv_len zigzag", (1, 14, 2, 16), 1, {"causal": True, "layout": "zigzag", "kv_len": 9}),
    ("causal kv_len", (1, 14, 2, 16), 1, {"causal": True, "kv_len": 5}),
    ("5-D axis 3", (2, 2, 3, 10, 16), 3, {}),
    ("fewer rows than ranks", (1, 2, 2, 16), 1, {}),
    ("fewer rows than ranks causal", (1, 2, 2, 16), 1, {"causal": True, "layout": "zigzag"}),
]


def _all_cases(backend: str, world: int, options: dict | None = None) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=world)
    return {
        name: compare_with_local(backend, shape, axis, backend_options=options, **kw) for name, shape, axis, kw in CASES
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", ["ring", "allgather"])
def test_matches_local(backend: str, world: int) -> None:
    results = run_distributed(_all_cases, world, backend, world)
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"{backend} P={world} rank {rank} {name}: {errors}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("chunks", [2, 100])
def test_allgather_chunks_match_local(world: int, chunks: int) -> None:
    """Gathers and reduce-scatters overlapped by (batch x kv head) chunks, also more chunks than groups."""
    results = run_distributed(_all_cases, world, "allgather", world, {"chunks": chunks})
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"allgather chunks={chunks} P={world} rank {rank} {name}: {errors}"


def _bad_chunks() -> str:
    mosaic.init(sp_size=2)
    try:
        compare_with_local("allgather", (1, 4, 2, 16), 1, backend_options={"chunks": 0})
    except mosaic.BackendNotSupported as exc:
        return str(exc)
    return "no error"


def test_allgather_rejects_bad_chunks() -> None:
    for message in run_distributed(_bad_chunks, 2):
        assert "chunks=0 must be a positive int" in message
