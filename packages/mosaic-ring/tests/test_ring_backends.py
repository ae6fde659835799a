"""ring and allgather against local on the unsharded tensor: outputs, input and parameter gradients."""

from __future__ import annotations

import pytest
import torch

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


def test_options_are_checked_when_the_module_is_built() -> None:
    """No process group needed: typed options fail at construction, naming the value or the valid fields."""
    with pytest.raises(ValueError, match="backend 'allgather': option chunks must be a positive int, got 0"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="allgather", backend_options={"chunks": 0})
    with pytest.raises(ValueError, match=r"backend 'allgather' has no option 'chunk' \(its options: chunks\)"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="allgather", backend_options={"chunk": 2})
    with pytest.raises(ValueError, match=r"backend 'ring' has no option 'mesh_shape' \(its options: none\)"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="ring", mesh_shape=(2, 2))
    module = mosaic.MultiAxisAttention(16, 4, 1)
    module.set_backend("allgather", chunks=3)
    assert module.backend_name == "allgather" and module.backend_options == {"chunks": 3}


@pytest.mark.parametrize("backend", ["ring", "allgather"])
def test_conformance_kit(backend: str) -> None:
    """The standard cases of mosaic.testing, filtered by what the backend declares."""
    results = mosaic.testing.run_conformance(backend, world_sizes=(3, 4))
    assert all(len(cases) == len(mosaic.testing.STANDARD_CASES) for cases in results.values())


def _replicated_queries(backend: str) -> dict[str, float]:
    """Queries every rank holds (inducing points) over keys sharded along the sequence."""
    ctx = mosaic.init(sp_size=torch.distributed.get_world_size())
    torch.manual_seed(0)
    q_full = torch.randn(2, 4, 5, 8)
    k_full, v_full = torch.randn(2, 4, 11, 8), torch.randn(2, 4, 11, 8)
    q = q_full.clone().requires_grad_()
    k, v = (ctx.shard(t, 2).clone().requires_grad_() for t in (k_full, v_full))
    out = mosaic.attention(q, k, v, backend=backend, kv_len=9)
    # Each rank's loss is its share of the total, as in a model: here 1/P of the same sum.
    (out.sum() / ctx.sp_size).backward()
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q_full, k_full, v_full))
    ref = torch.nn.functional.scaled_dot_product_attention(ref_q, ref_k[:, :, :9], ref_v[:, :, :9])
    ref.sum().backward()
    dq = q.grad.clone()
    torch.distributed.all_reduce(dq, group=ctx.sp_group)  # reduce_gradients does this for parameters
    return {
        "out": float((out - ref).abs().max()),
        "dq": float((dq - ref_q.grad).abs().max()),
        "dk": float((ctx.unshard(k.grad, 2) - ref_k.grad).abs().max()),
    }


@pytest.mark.parametrize("backend", ["ring", "allgather"])
def test_replicated_queries_over_sharded_keys(backend: str) -> None:
    for errors in run_distributed(_replicated_queries, 3, backend):
        assert max(errors.values()) < TOL, errors
