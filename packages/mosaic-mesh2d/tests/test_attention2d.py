"""``MultiAxisAttention2D`` against local attention over the flattened joint sequence, same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mosaic
from mosaic.backend import BackendNotSupported
from mosaic.testing import max_error, run_distributed
from mosaic_mesh2d import MultiAxisAttention2D

TOL = 1e-5
MESHES = [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 3)]

# (name, shape, (axis1, axis2), extra kwargs); embed 16 and 4 heads. Lengths split unevenly
# over most meshes, and "tiny" leaves some ranks with an empty block.
CASES = [
    ("4-D", (2, 6, 5, 16), (1, 2), {}),
    ("4-D kv_len whole rows", (2, 6, 5, 16), (1, 2), {"kv_len": 15}),
    ("4-D kv_len mid-row", (1, 7, 5, 16), (1, 2), {"kv_len": 13}),
    ("5-D", (2, 5, 2, 7, 16), (1, 3), {}),
    ("5-D reversed axes kv_len", (1, 5, 2, 7, 16), (3, -4), {"kv_len": 9}),
    ("cross kv_len", (2, 6, 5, 16), (1, 2), {"kv_shape": (2, 4, 3, 16), "kv_len": 7}),
    ("gqa", (2, 4, 6, 16), (1, 2), {"num_kv_heads": 2}),
    ("tiny", (1, 3, 2, 16), (1, 2), {"kv_len": 2}),
]


def _joint(t: torch.Tensor, d1: int, d2: int) -> torch.Tensor:
    """The joint dims moved next to embed and flattened row-major (axis1 major)."""
    return t.movedim((d1, d2), (-3, -2)).flatten(-3, -2)


def compare_2d(
    shape: tuple[int, ...],
    axes: tuple[int, int],
    mesh: tuple[int, int],
    *,
    kv_shape: tuple[int, ...] | None = None,
    kv_len: int | None = None,
    num_kv_heads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Errors of the sharded module against ``local`` over the flattened joint sequence (out, dx, dkv, params)."""
    ctx = mosaic.get_context()
    torch.manual_seed(seed)
    module = MultiAxisAttention2D(shape[-1], 4, *axes, mesh, num_kv_heads=num_kv_heads)
    reference = mosaic.MultiAxisAttention(shape[-1], 4, -2, num_kv_heads=num_kv_heads, sharded=False)
    reference.load_state_dict(module.state_dict())
    x_full, grad_full = torch.randn(shape), torch.randn(shape)
    kv_full = None if kv_shape is None else torch.randn(kv_shape)

    x = module.shard(x_full).contiguous().requires_grad_()
    kv = None if kv_full is None else module.shard(kv_full).contiguous().requires_grad_()
    y = module(x, kv, kv_len=kv_len)
    y.backward(module.shard(grad_full))
    mosaic.reduce_gradients(module, ctx, average_dp=False)

    d1, d2 = (a % len(shape) for a in axes)
    x_ref = x_full.clone().requires_grad_()
    kv_ref = None if kv_full is None else kv_full.clone().requires_grad_()
    y_ref = reference(_joint(x_ref, d1, d2), None if kv_ref is None else _joint(kv_ref, d1, d2), kv_len=kv_len)
    y_ref = y_ref.unflatten(-2, (shape[d1], shape[d2])).movedim((-3, -2), (d1, d2))
    y_ref.backward(grad_full)

    ref_params = dict(reference.named_parameters())
    errors = {
        "out": max_error(module.unshard(y.detach()), y_ref.detach()),
        "dx": max_error(module.unshard(x.grad), x_ref.grad),
        "params": max(max_error(p.grad, ref_params[n].grad) for n, p in module.named_parameters()),
    }
    if kv is not None:
        errors["dkv"] = max_error(module.unshard(kv.grad), kv_ref.grad)
    return errors


def _all_cases(mesh: tuple[int, int]) -> dict[str, dict[str, float]]:
    mosaic.init(sp_size=mesh[0] * mesh[1])
    return {name: compare_2d(shape, axes, mesh, **kw) for name, shape, axes, kw in CASES}


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_matches_joint_local(mesh: tuple[int, int]) -> None:
    results = run_distributed(_all_cases, mesh[0] * mesh[1], mesh)
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            assert max(errors.values()) < TOL, f"mesh {mesh} rank {rank} {name}: {errors}"


def test_one_process_world() -> None:
    mosaic.init()
    try:
        errors = compare_2d((2, 3, 4, 16), (1, 2), (1, 1), kv_len=5)
    finally:
        mosaic.shutdown()
    assert max(errors.values()) < TOL, errors


def _refusals() -> dict[str, str]:
    """The errors a (2, 2) mesh raises for inputs it can't run, as text."""
    mosaic.init(sp_size=4)
    module = MultiAxisAttention2D(16, 4, 1, 2, (2, 2))
    out = {}
    full = torch.randn(1, 5, 4, 16)
    for name, call in {
        "causal": lambda: module(module.shard(full), causal=True),
        # dim1 split over all four ranks: blocks of one mesh row differ in length.
        "not a grid": lambda: module(full.tensor_split(4, 1)[mosaic.get_context().sp_rank]),
        "kv_len too long": lambda: module(module.shard(full), kv_len=21),
    }.items():
        try:
            call()
            out[name] = "no error"
        except (ValueError, BackendNotSupported) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def test_refusals_are_clear_and_agree_on_every_rank() -> None:
    results = run_distributed(_refusals, 4)
    assert all(r == results[0] for r in results)
    assert "BackendNotSupported" in results[0]["causal"] and "causal=True over a 2-D grid" in results[0]["causal"]
    assert "do not form a grid" in results[0]["not a grid"] and "mesh row 0" in results[0]["not a grid"]
    assert "kv_len=21 is outside [1, 20]" in results[0]["kv_len too long"]


def test_constructor_checks_and_checkpoint_names() -> None:
    with pytest.raises(ValueError, match="mesh_shape must be two positive ints"):
        MultiAxisAttention2D(16, 4, 1, 2, (4,))
    with pytest.raises(ValueError, match="axis1 and axis2 must be different"):
        MultiAxisAttention2D(16, 4, 1, 1, (2, 2))
    module = MultiAxisAttention2D(16, 4, 1, 2, (2, 2))
    with pytest.raises(ValueError, match="same dim"):
        MultiAxisAttention2D(16, 4, 1, -3, (2, 2))._joint_dims(torch.zeros(1, 2, 3, 16))
    with pytest.raises(ValueError, match="not a token dim"):
        MultiAxisAttention2D(16, 4, 1, 3, (2, 2))._joint_dims(torch.zeros(1, 2, 3, 16))
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    module.load_state_dict(mha.state_dict())
    assert torch.equal(module.in_proj_weight, mha.in_proj_weight)


def test_lazy_export_from_core() -> None:
    assert mosaic.MultiAxisAttention2D is MultiAxisAttention2D
