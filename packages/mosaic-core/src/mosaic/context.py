"""Process groups: ``mosaic.init`` and the :class:`Context` it returns.

Ranks form a grid ``(dp, sp)``: the ``sp`` ranks of one row share the
sharded axis (contiguous global ranks, so on one node where possible), the
``dp`` rows are data-parallel replicas. Strategies that split the sp group
further (2-D meshes, head x sequence) ask :meth:`Context.grid` for it.

Naming rule (also in docs/architecture.md): a *mesh axis* is an axis of the
rank grid (``dp``, ``sp``, a 2-D mesh's rows and columns); a *dim* is a
tensor dimension (the attention dim, the embed dim).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import layout as _layout
from ._compat import all_gather_single
from .comm import all_gather_uneven
from .layout import LayoutKind, SeqLayout

DEFAULT_TIMEOUT = timedelta(minutes=5)

_context: Context | None = None


@dataclass(frozen=True)
class Grid:
    """The sp group of this rank split into a row-major grid of ``shape``.

    ``groups[i]`` holds the ranks that differ from this one only along mesh
    axis ``i``; ``coords`` is this rank's position in the grid.
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    coords: tuple[int, ...]
    groups: tuple[dist.ProcessGroup, ...]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.groups[self.names.index(name)]


@dataclass
class Context:
    """Where this process sits: devices, ranks and process groups.

    ``sp_group`` is ``None`` only in a one-process world started without a
    launcher; every collective then has nothing to do.
    """

    device: torch.device
    rank: int
    world_size: int
    sp_rank: int
    sp_size: int
    sp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None
    timeout: timedelta
    rank_grid: torch.Tensor | None = field(repr=False, default=None)
    meta_group: dist.ProcessGroup | None = field(repr=False, default=None)
    owns_process_group: bool = field(repr=False, default=False)
    created_groups: list = field(repr=False, default_factory=list)
    _grids: dict = field(repr=False, default_factory=dict)

    def layout(self, total: int, layout: LayoutKind = "contiguous") -> SeqLayout:
        """How ``total`` positions are spread over the sp group by :meth:`shard`."""
        return SeqLayout.even(total, self.sp_size, layout)

    def shard(self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous") -> torch.Tensor:
        """This rank's part of a full tensor along ``dim`` (uneven lengths as ``tensor_split``)."""
        return _layout.shard(x, dim, self.sp_rank, self.sp_size, layout)

    def unshard(self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous") -> torch.Tensor:
        """The full tensor from every rank's part along ``dim`` (not differentiable)."""
        if self.sp_group is None or self.sp_size == 1:
            return x
        sizes = self.gather_sizes(x.shape[dim])
        with torch.no_grad():
            full = all_gather_uneven(x, sizes, dim % x.dim(), self.sp_group)
        parts = list(full.split(sizes, dim))
        return _layout.unshard(parts, dim, layout)

    def gather_sizes(self, local: int) -> list[int]:
        """Every sp rank's value of the integer ``local`` (over the CPU metadata group)."""
        return exchange_ints(self, [local])[:, 0].tolist()

    def grid(self, shape: tuple[int, ...], names: tuple[str, ...], group: dist.ProcessGroup | None = None) -> Grid:
        """Split ``group`` (default: the sp group) into a row-major grid of ``shape``.

        ``group`` may be any group that every rank of the world holds one of,
        such as one mesh axis of a grid made here (a composition hands its
        sequence group to an inner strategy this way). Cached; collective over
        the world on first use, so every rank must ask for the same grids in
        the same order, which SPMD programs do: the first forward of a module
        builds its grid.
        """
        shape = tuple(int(s) for s in shape)
        whole = group is None or group is self.sp_group
        members = None if whole or self.rank_grid is None else tuple(dist.get_process_group_ranks(group))
        key = (shape, tuple(names), members)
        if key in self._grids:
            return self._grids[key]
        size, rank = (self.sp_size, self.sp_rank) if members is None else (len(members), dist.get_rank(group))
        if len(shape) != len(names):
            raise ValueError(f"grid shape {shape} and names {names} differ in length")
        if _prod(shape) != size:
            raise ValueError(f"grid shape {shape} has {_prod(shape)} ranks but the group to split has {size}")
        coords = tuple(int(c) for c in torch.tensor(range(size)).view(shape).eq(rank).nonzero()[0])
        if self.rank_grid is None:
            groups: tuple = (None,) * len(shape)
        else:
            # Every rank's copy of the group, so that all of them create the same groups in the same order.
            lines = self.rank_grid if members is None else _gather_groups(list(members), self.world_size, self.device)
            cube = lines.view(-1, *shape)
            groups = tuple(
                _groups_along(cube, axis + 1, self.rank, self.timeout, self.device, self.created_groups)
                for axis in range(len(shape))
            )
        grid = Grid(shape, tuple(names), coords, groups)
        self._grids[key] = grid
        return grid


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def exchange_ints(ctx: Context, values: list[int]) -> torch.Tensor:
    """``(sp_size, len(values))``: every sp rank's integers, over the CPU metadata group."""
    mine = torch.tensor(values, dtype=torch.int64)
    if ctx.meta_group is None or ctx.sp_size == 1:
        return mine.unsqueeze(0)
    out = torch.empty(ctx.sp_size * len(values), dtype=torch.int64)
    all_gather_single(out, mine, group=ctx.meta_group)
    return out.view(ctx.sp_size, len(values))


def _groups_along(
    cube: torch.Tensor,
    axis: int,
    rank: int,
    timeout: timedelta,
    device: torch.device,
    created: list,
    backend: str | None = None,
) -> dist.ProcessGroup:
    """Create (collectively) every group along ``axis`` of the rank grid; return this rank's."""
    lines = cube.movedim(axis, -1).reshape(-1, cube.shape[axis]).tolist()
    mine = None
    for ranks in lines:
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            mine = group
            created.append(group)
    assert mine is not None, "every rank sits on one line of each axis"
    if backend is None and device.type == "cuda":
        # Bring the NCCL communicator up now, so the first P2P ring step is not its first use.
        dist.all_reduce(torch.zeros(1, device=device), group=mine)
    return mine


def get_context() -> Context:
    """The context :func:`init` created; a clear error before it."""
    if _context is None:
        raise RuntimeError(
            "Mosaic is not initialised: call mosaic.init(sp_size=...) first (under torchrun for several processes)"
        )
    return _context


def is_initialized() -> bool:
    return _context is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init(
    sp_size: int | None = None,
    *,
    backend: str | None = None,
    mesh: DeviceMesh | None = None,
    sp_group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Context:
    """Set up Mosaic's process groups and return the :class:`Context`.

    Args:
        sp_size: ranks that share the sharded axis (default 1, or the size of
            ``mesh``/``sp_group``); ``world_size % sp_size`` must be 0, the rest is
            data parallel.
        backend: process-group backend when Mosaic starts torch.distributed
            (default: ``nccl`` on CUDA, ``gloo`` on CPU).
        mesh: an existing ``DeviceMesh`` with an ``"sp"`` dim (and optionally ``"dp"``),
            or a 1-D mesh used as the sp group.
        sp_group: an existing process group to use as the sp group.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout: collective timeout, so a lost peer raises instead of hanging.

    Without torchrun's environment and without an initialised process group
    this is a one-process world and needs no process group.
    """
    global _context
    if _context is not None:
        raise RuntimeError("Mosaic is already initialised; call mosaic.shutdown() before init() again")
    if mesh is not None and sp_group is not None:
        raise ValueError("pass either mesh or sp_group, not both")
    device = _pick_device(device)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not dist.is_initialized() and not launched and mesh is None and sp_group is None:
        if sp_size not in (None, 1):
            raise ValueError(
                f"sp_size={sp_size} needs {sp_size} processes, but this is a one-process world; "
                f"launch with torchrun --nproc_per_node={sp_size}"
            )
        _context = Context(device, 0, 1, 0, 1, None, 0, 1, None, None, timeout)
        return _context
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = _sp_rows(world, sp_size, mesh, sp_group, device)
    try:
        ctx = _build(device, rank, world, rows, timeout, owns)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    _context = ctx
    return ctx


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # A bare "cuda" means this process's GPU, not GPU 0 for everyone.
            device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    elif torch.cuda.is_available():
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _gather_groups(mine: list[int], world: int, device: torch.device) -> torch.Tensor:
    """Every rank's sp group (a tensor collective: object collectives would need numpy)."""
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(sizes, torch.tensor([len(mine)], device=device))
    if len(set(sizes.tolist())) != 1:
        raise ValueError(f"the sp groups passed on the ranks differ in size: {sizes.tolist()}")
    every = torch.empty(world * len(mine), dtype=torch.int64, device=device)
    all_gather_single(every, torch.tensor(mine, device=device))
    rows = torch.unique(every.view(world, len(mine)).cpu(), dim=0)
    if rows.numel() != world or sorted(rows.flatten().tolist()) != list(range(world)):
        raise ValueError("the sp groups passed on the ranks do not partition the world")
    return rows


def _sp_rows(world: int, sp_size: int | None, mesh: DeviceMesh | None, sp_group, device: torch.device) -> torch.Tensor:
    """The rank grid ``(dp, sp)``: row ``i`` lists the global ranks of one sp group."""
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if mesh.ndim > 1 and "sp" not in names:
            raise ValueError(f"the mesh needs an 'sp' dim; it has {names}")
        grid = mesh.mesh if mesh.ndim == 1 else mesh.mesh.movedim(names.index("sp"), -1)
        rows = grid.reshape(-1, grid.shape[-1])
        if rows.numel() != world:
            raise ValueError(f"the mesh covers {rows.numel()} ranks but the world has {world}")
    elif sp_group is not None:
        rows = _gather_groups(dist.get_process_group_ranks(sp_group), world, device)
    else:
        sp = 1 if sp_size is None else sp_size
        if sp < 1 or world % sp != 0:
            raise ValueError(f"world_size {world} is not divisible by sp_size {sp}")
        rows = torch.arange(world).view(world // sp, sp)
    if sp_size is not None and rows.shape[1] != sp_size:
        raise ValueError(f"sp_size={sp_size} but the given sp group has {rows.shape[1]} ranks")
    return rows


def _build(device, rank, world, rows: torch.Tensor, timeout, owns) -> Context:
    created: list = []
    sp_group = _groups_along(rows, 1, rank, timeout, device, created)
    dp_group = _groups_along(rows, 0, rank, timeout, device, created)
    if dist.get_backend() == "gloo":
        meta = sp_group
    else:
        # Shapes are exchanged on the host, so they never wait behind GPU work.
        meta = _groups_along(rows, 1, rank, timeout, torch.device("cpu"), created, backend="gloo")
    where = (rows == rank).nonzero()[0].tolist()
    mesh = DeviceMesh.from_group([dp_group, sp_group], device.type, mesh=rows, mesh_dim_names=("dp", "sp"))
    return Context(
        device=device,
        rank=rank,
        world_size=world,
        sp_rank=where[1],
        sp_size=rows.shape[1],
        sp_group=sp_group,
        dp_rank=where[0],
        dp_size=rows.shape[0],
        dp_group=dp_group,
        mesh=mesh,
        timeout=timeout,
        rank_grid=rows,
        meta_group=meta,
        owns_process_group=owns,
        created_groups=created,
    )


def shutdown() -> None:
    """Forget the context; tear down the process group if :func:`init` created it."""
    global _context
    ctx, _context = _context, None
    if ctx is None or not dist.is_initialized():
        return
    if ctx.owns_process_group:
        dist.destroy_process_group()
    else:
        for group in ctx.created_groups:
            dist.destroy_process_group(group)
