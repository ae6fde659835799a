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
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import layout as _layout
from ._compat import all_gather_single
from .comm import all_gather_uneven, reduce_scatter_uneven
from .guard import HELPER, Guard, site_id
from .layout import LAYOUTS, LayoutKind, SeqLayout, check_layout

if TYPE_CHECKING:
    from .sharded import ShardedDim

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "Context",
    "Grid",
    "exchange_ints",
    "get_context",
    "init",
    "is_initialized",
    "shutdown",
]

DEFAULT_TIMEOUT = timedelta(minutes=5)
# Ranks arrive at a collective within a step's imbalance of each other: one that has not arrived
# after a minute is not coming.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(seconds=60)
CHECKS = ("every_call", "on_change")
Checks = Literal["every_call", "on_change"]

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
    launcher; every collective then has nothing to do. ``guard`` agrees on
    every sharded call over a gloo group of its own (:mod:`mosaic.guard`);
    ``world_guard`` does the same over the whole world (``reduce_gradients``).
    ``sharded_dims`` records which tensor dims (counted from the front) are
    sharded over the sp group, and how: :meth:`shard` and :meth:`declare_sharded`
    fill it, and modules check their backend against it.
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
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT
    checks: Checks = "every_call"
    guard: Guard = field(repr=False, default=None)  # type: ignore[assignment]
    world_guard: Guard = field(repr=False, default=None)  # type: ignore[assignment]
    sharded_dims: dict[int, str] = field(default_factory=dict)
    rank_grid: torch.Tensor | None = field(repr=False, default=None)
    owns_process_group: bool = field(repr=False, default=False)
    created_groups: list = field(repr=False, default_factory=list)
    plans: OrderedDict = field(repr=False, default_factory=OrderedDict)
    agreed: dict = field(repr=False, default_factory=dict)  # checks="on_change": last agreed problem per call
    _grids: dict = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.guard is None:
            self.guard = Guard(None, self.sp_rank, 1, self.collective_timeout)
        if self.world_guard is None:
            self.world_guard = Guard(None, self.rank, 1, self.collective_timeout, "world")

    def layout(self, total: int, layout: LayoutKind = "contiguous") -> SeqLayout:
        """How ``total`` positions are spread over the sp group by :meth:`shard`."""
        return SeqLayout.even(total, self.sp_size, layout)

    def shard(
        self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous", *, declare: bool = True
    ) -> torch.Tensor:
        """This rank's part of a full tensor along ``dim`` (uneven lengths as ``tensor_split``).

        With ``declare`` (the default) it records that ``dim`` is sharded with ``layout``
        (:meth:`declare_sharded`), so that a layer attending over it with ``backend="local"``,
        or over another dim with a distributed backend, raises instead of computing the wrong thing.
        """
        dim = _dim(x, dim)
        if declare:
            self.declare_sharded(dim, layout)
        return _layout.shard(x, dim, self.sp_rank, self.sp_size, layout)

    def sharded_dim(self, total: int, dim: int | None = None, layout: LayoutKind = "contiguous") -> ShardedDim:
        """Where this rank's part of a dim of ``total`` positions sits (:class:`mosaic.sharded.ShardedDim`).

        With ``dim`` it also declares that dim sharded (:meth:`declare_sharded`), for
        model code that draws or loads its own rows instead of calling :meth:`shard`.
        """
        from .sharded import ShardedDim

        if total < self.sp_size:
            raise ValueError(f"{total} positions cannot be sharded over {self.sp_size} ranks: every rank needs one")
        if dim is not None:
            self.declare_sharded(dim, layout)
        return ShardedDim.of(self, total, layout)

    def declare_sharded(self, dim: int, layout: LayoutKind | None = "contiguous") -> None:
        """Declare that model tensors are sharded along ``dim`` (from the front) with ``layout``.

        For tensors sharded by hand (each rank loads or draws its own rows);
        ``layout=None`` withdraws the declaration.
        """
        if dim < 0:
            raise ValueError(f"declare dims counted from the front (>= 0), got {dim}")
        if layout is None:
            self.sharded_dims.pop(dim, None)
            return
        check_layout(layout)
        self.sharded_dims[dim] = layout

    def sharding_code(self, dim: int) -> int:
        """The guard's fact for ``dim``: 0 when not declared sharded, else 1 + its layout's index.

        Declarations other than the two layouts (a 2-D grid's) get ``1 + len(LAYOUTS)``.
        """
        layout = self.sharded_dims.get(dim)
        if layout is None:
            return 0
        return 1 + (LAYOUTS.index(layout) if layout in LAYOUTS else len(LAYOUTS))

    def unshard(self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous") -> torch.Tensor:
        """The full tensor from every rank's part along ``dim``; collective over the sp group.

        Differentiable under Mosaic's loss convention (each rank's loss is a share
        of the total): the gradient of this rank's part sums every rank's gradient
        of the full tensor at those rows.
        """
        if self.sp_group is None or self.sp_size == 1:
            return x
        dim = _dim(x, dim)
        sizes = self.gather_sizes(x.shape[dim])
        return _Unshard.apply(x, sizes, dim, layout, self.sp_group)

    def gather_sizes(self, local: int) -> list[int]:
        """Every sp rank's value of the integer ``local`` (one guarded exchange on the host)."""
        return [row[0] for row in exchange_ints(self, [local], "gather_sizes")]

    def grid(self, shape: tuple[int, ...], names: tuple[str, ...], group: dist.ProcessGroup | None = None) -> Grid:
        """Split ``group`` (default: the sp group) into a row-major grid of ``shape``.

        ``group`` may be any group that every rank of the world holds one of,
        such as one mesh axis of a grid made here (a composition hands its
        sequence group to an inner strategy this way). Cached; collective over
        the world on first use, so every rank must ask for the same grids in
        the same order: backends ask for theirs when a module is built
        (``Backend.prepare``), or at the latest when they first plan.
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
                _groups_along(cube, axis + 1, self.rank, self.collective_timeout, self.device, self.created_groups)
                for axis in range(len(shape))
            )
        grid = Grid(shape, tuple(names), coords, groups)
        self._grids[key] = grid
        return grid


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


class _Unshard(torch.autograd.Function):
    """All-gather along a dim; the backward reduce-scatters the gradient (fp32) back to the parts' owners."""

    @staticmethod
    def forward(ctx, x, sizes: list[int], dim: int, layout: str, group):
        ctx.sizes, ctx.dim, ctx.layout, ctx.group = sizes, dim, layout, group
        full = all_gather_uneven(x, sizes, dim, group)
        return _layout.unshard(list(full.split(sizes, dim)), dim, layout)

    @staticmethod
    def backward(ctx, grad):
        p = len(ctx.sizes)
        rank_major = torch.cat([_layout.shard(grad, ctx.dim, r, p, ctx.layout) for r in range(p)], ctx.dim)
        wide = torch.promote_types(grad.dtype, torch.float32)
        summed = reduce_scatter_uneven(rank_major, ctx.sizes, ctx.dim, ctx.group, wide)
        return summed.to(grad.dtype), None, None, None, None


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def exchange_ints(ctx: Context, values: list[int], what: str = "exchange_ints") -> list[tuple[int, ...]]:
    """Every sp rank's integers (rows in sp-rank order), through the guard: one host collective."""
    return ctx.guard.agree(HELPER, what, values)


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
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT,
    checks: Checks = "every_call",
) -> Context:
    """Set up Mosaic's process groups and return the :class:`Context`.

    Args:
        sp_size: ranks that share the sharded dim (default 1, or the size of
            ``mesh``/``sp_group``); ``world_size % sp_size`` must be 0, the rest is
            data parallel.
        backend: process-group backend when Mosaic starts torch.distributed
            (default: ``nccl`` on CUDA, ``gloo`` on CPU).
        mesh: an existing ``DeviceMesh`` with an ``"sp"`` dim (and optionally ``"dp"``),
            or a 1-D mesh used as the sp group.
        sp_group: an existing process group to use as the sp group.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout: timeout of the process group when Mosaic starts it (the world group, which
            DDP and the user's own collectives use).
        collective_timeout: how long a rank waits for the others in any of Mosaic's own
            collectives — a sharded call's guard (:mod:`mosaic.guard`), the strategies'
            transfers, ``reduce_gradients`` — before every waiting rank raises an error that
            names the call. Well under ``timeout``: a rank that skipped a call or a backward,
            or raised and went on, is reported in a minute, not after the process-group timeout.
        checks: ``"every_call"`` (default): every sharded call and its backward start with
            the guard's host collective, so any disagreement or skipped call raises the same
            error on every rank at once. ``"on_change"``: the guard runs only when a call's
            local facts differ from the last agreed ones (and not in backward), so repeated
            shapes run no host collective at all; a disagreement that starts on some ranks
            only, or a skipped call, then ends with a :class:`~mosaic.errors.CollectiveTimeout`
            after ``collective_timeout`` instead of an immediate error.

    Every rank must pass the same arguments: they are compared across the world
    first, and a mismatch raises the same error on every rank. Without
    torchrun's environment and without an initialised process group this is a
    one-process world and needs no process group. If ``init`` fails, it leaves
    no process group behind that it started.
    """
    global _context
    if _context is not None:
        raise RuntimeError("Mosaic is already initialised; call mosaic.shutdown() before init() again")
    if checks not in CHECKS:
        raise ValueError(f"checks must be one of {CHECKS}, got {checks!r}")
    if mesh is not None and sp_group is not None:
        raise ValueError("pass either mesh or sp_group, not both")
    if sp_size is not None and (isinstance(sp_size, bool) or not isinstance(sp_size, int)):
        raise TypeError(f"sp_size must be an int, got {sp_size!r}")
    device = _pick_device(device)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not dist.is_initialized() and not launched and mesh is None and sp_group is None:
        if sp_size not in (None, 1):
            raise ValueError(
                f"sp_size={sp_size} needs {sp_size} processes, but this is a one-process world; "
                f"launch with torchrun --nproc_per_node={sp_size}"
            )
        _context = Context(device, 0, 1, 0, 1, None, 0, 1, None, None, timeout, collective_timeout, checks)
        return _context
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owns = True
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        _agree_on_arguments(sp_size, mesh, sp_group, device, collective_timeout, checks)
        rows = _sp_rows(world, sp_size, mesh, sp_group, device)
        ctx = _build(device, rank, world, rows, timeout, collective_timeout, checks, owns)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    _context = ctx
    return ctx


def _agree_on_arguments(
    sp_size, mesh, sp_group, device: torch.device, collective_timeout: timedelta, checks: str
) -> None:
    """Compare ``init``'s arguments over the world before any group exists; the same error everywhere."""
    mode = 0 if mesh is None and sp_group is None else (1 if mesh is not None else 2)
    shape = 0 if mesh is None else site_id(repr((mesh.mesh.tolist(), mesh.mesh_dim_names)))
    mine = [-1 if sp_size is None else sp_size, mode, shape, ("cpu", "cuda").index(device.type),
            int(collective_timeout.total_seconds() * 1000), CHECKS.index(checks)]  # fmt: skip
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    every = torch.empty(dist.get_world_size() * len(mine), dtype=torch.int64, device=where)
    all_gather_single(every, torch.tensor(mine, dtype=torch.int64, device=where))
    table = every.view(-1, len(mine)).cpu().tolist()
    names = ("sp_size", "mesh or sp_group given", "mesh", "device type", "collective_timeout (ms)", "checks")
    for column, name in enumerate(names):
        values = [row[column] for row in table]
        if len(set(values)) != 1:
            if name == "sp_size":
                values = [None if v == -1 else v for v in values]
            if name == "device type":
                values = [("cpu", "cuda")[v] for v in values]
            raise ValueError(
                f"mosaic.init got different arguments on different ranks: {name} is {values} on ranks "
                f"0..{len(values) - 1}; every rank must call mosaic.init with the same arguments"
            )


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


def _build(device, rank, world, rows: torch.Tensor, timeout, collective_timeout, checks, owns) -> Context:
    created: list = []
    sp_group = _groups_along(rows, 1, rank, collective_timeout, device, created)
    dp_group = _groups_along(rows, 0, rank, collective_timeout, device, created)
    # The guards run on gloo groups of their own: on the host (never behind GPU work), never paired
    # with a data collective, and with their own, shorter timeout.
    cpu = torch.device("cpu")
    meta = _groups_along(rows, 1, rank, collective_timeout, cpu, created, backend="gloo")
    everyone = _groups_along(rows.reshape(1, -1), 1, rank, collective_timeout, cpu, created, backend="gloo")
    where = (rows == rank).nonzero()[0].tolist()
    mesh = DeviceMesh.from_group([dp_group, sp_group], device.type, mesh=rows, mesh_dim_names=("dp", "sp"))
    sp_rank, sp_size = where[1], rows.shape[1]
    return Context(
        device=device,
        rank=rank,
        world_size=world,
        sp_rank=sp_rank,
        sp_size=sp_size,
        sp_group=sp_group,
        dp_rank=where[0],
        dp_size=rows.shape[0],
        dp_group=dp_group,
        mesh=mesh,
        timeout=timeout,
        collective_timeout=collective_timeout,
        checks=checks,
        guard=Guard(meta, sp_rank, sp_size, collective_timeout),
        world_guard=Guard(everyone, rank, world, collective_timeout, "world"),
        rank_grid=rows,
        owns_process_group=owns,
        created_groups=created,
    )


def shutdown() -> None:
    """Forget the context; tear down the process group if :func:`init` created it, else the groups it made.

    ``init`` may be called again afterwards.
    """
    global _context
    ctx, _context = _context, None
    if ctx is None or not dist.is_initialized():
        return
    if ctx.owns_process_group:
        dist.destroy_process_group()
    else:
        for group in ctx.created_groups:
            dist.destroy_process_group(group)
