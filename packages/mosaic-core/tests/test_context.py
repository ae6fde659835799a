"""mosaic.init and Context: one-process world, dp x sp grids, existing meshes/groups, clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import mosaic
from mosaic.local import span_plan
from mosaic.testing import run_distributed


class _EchoBackend(mosaic.Backend):
    """A distributed backend that only checks the agreed facts, then attends locally."""

    name = "echo"
    capabilities = mosaic.Capabilities()

    def plan(self, problem):
        return span_plan(problem)


@pytest.fixture
def one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    yield
    mosaic.shutdown()


def test_one_process_world_needs_no_process_group(one_process):
    with pytest.raises(RuntimeError, match=r"not initialised: call mosaic.init"):
        mosaic.get_context()
    ctx = mosaic.init()
    assert (ctx.world_size, ctx.sp_size, ctx.sp_rank, ctx.sp_group, ctx.mesh) == (1, 1, 0, None, None)
    x = torch.randn(2, 5, 3)
    assert ctx.shard(x, 1) is not None and torch.equal(ctx.unshard(ctx.shard(x, 1), 1), x)
    with pytest.raises(RuntimeError, match="already initialised"):
        mosaic.init()


def test_one_process_world_refuses_sp_size(one_process):
    with pytest.raises(ValueError, match=r"sp_size=4 needs 4 processes.*torchrun --nproc_per_node=4"):
        mosaic.init(sp_size=4)


def test_distributed_backend_before_init_is_a_clear_error(one_process):
    mosaic.register_backend("echo", _EchoBackend, override=True)
    try:
        module = mosaic.MultiAxisAttention(16, 4, 1, backend="echo")
        with pytest.raises(RuntimeError, match="not initialised"):
            module(torch.randn(2, 5, 3, 16))
    finally:
        mosaic.unregister_backend("echo")


def _grid_facts(sp_size: int, length: int):
    ctx = mosaic.init(sp_size=sp_size)
    x = torch.arange(2.0 * length).view(2, length)
    part = ctx.shard(x, 1)
    back = ctx.unshard(part, 1)
    zig = ctx.unshard(ctx.shard(x, 1, "zigzag"), 1, "zigzag")
    return {
        "sp": (ctx.sp_rank, ctx.sp_size, dist.get_process_group_ranks(ctx.sp_group)),
        "dp": (ctx.dp_rank, ctx.dp_size, dist.get_process_group_ranks(ctx.dp_group)),
        "mesh": ctx.mesh.mesh_dim_names,
        "len": part.shape[1],
        "round_trip": torch.equal(back, x) and torch.equal(zig, x),
        "sizes": ctx.gather_sizes(part.shape[1]),
    }


def test_dp_by_sp_grid_and_uneven_sharding():
    facts = run_distributed(_grid_facts, 4, 2, 7)
    assert [f["sp"] for f in facts] == [(0, 2, [0, 1]), (1, 2, [0, 1]), (0, 2, [2, 3]), (1, 2, [2, 3])]
    assert [f["dp"] for f in facts] == [(0, 2, [0, 2]), (0, 2, [1, 3]), (1, 2, [0, 2]), (1, 2, [1, 3])]
    assert all(f["mesh"] == ("dp", "sp") and f["round_trip"] and f["sizes"] == [4, 3] for f in facts)
    assert [f["len"] for f in facts] == [4, 3, 4, 3]


def _init_error(sp_size: int) -> str:
    try:
        mosaic.init(sp_size=sp_size)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_world_not_divisible_by_sp_size():
    assert run_distributed(_init_error, 4, 3) == ["world_size 4 is not divisible by sp_size 3"] * 4


def _from_existing(kind: str):
    if kind == "mesh":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
        ctx = mosaic.init(mesh=mesh)
    else:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ctx = mosaic.init(sp_group=groups[dist.get_rank() // 2])
    return ctx.sp_rank, ctx.sp_size, dist.get_process_group_ranks(ctx.sp_group), ctx.dp_size


@pytest.mark.parametrize("kind", ["mesh", "sp_group"])
def test_accepts_an_existing_mesh_or_group(kind):
    expected = [(0, 2, [0, 1], 2), (1, 2, [0, 1], 2), (0, 2, [2, 3], 2), (1, 2, [2, 3], 2)]
    assert run_distributed(_from_existing, 4, kind) == expected


def _disagreeing_shapes() -> str:
    mosaic.register_backend("echo", _EchoBackend, override=True)
    mosaic.init(sp_size=2).declare_sharded(1)
    module = mosaic.MultiAxisAttention(16, 4, 1, backend="echo")
    batch = 2 if dist.get_rank() == 0 else 3
    try:
        module(torch.randn(batch, 5, 3, 16))
    except ValueError as exc:
        return str(exc)
    finally:
        mosaic.unregister_backend("echo")
    return "no error"


def test_shapes_that_disagree_across_ranks_fail_on_every_rank():
    messages = run_distributed(_disagreeing_shapes, 2)
    assert all("disagree across the sp group: batch" in m and "[6, 9]" in m for m in messages)


def _lost_peer_times_out() -> str:
    ctx = mosaic.init(sp_size=2, collective_timeout=timedelta(seconds=2))
    if ctx.sp_rank == 1:
        return "absent"
    try:
        dist.all_reduce(torch.ones(1), group=ctx.sp_group)
    except RuntimeError as exc:
        return f"raised: {type(exc).__name__}"
    return "no error"


def test_lost_peer_raises_instead_of_hanging():
    assert run_distributed(_lost_peer_times_out, 2, timeout=60)[0].startswith("raised")


def _grids():
    ctx = mosaic.init(sp_size=4)
    grid = ctx.grid((2, 2), ("outer", "inner"))
    inner = grid.group("inner")
    split = ctx.grid((2, 1), ("x", "y"), group=inner)  # a grid of one mesh axis's group
    return (
        grid.coords,
        dist.get_process_group_ranks(grid.group("outer")),
        dist.get_process_group_ranks(inner),
        split.coords,
        dist.get_process_group_ranks(split.group("x")),
        ctx.grid((2, 2), ("outer", "inner")) is grid,
    )


def test_grids_of_the_sp_group_and_of_its_subgroups():
    results = run_distributed(_grids, 4)
    assert [r[0] for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r[1] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r[2] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[3] for r in results] == [(0, 0), (1, 0), (0, 0), (1, 0)]
    assert [r[4] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r[5] for r in results)
