"""Mosaic's process groups: the ``(dp, sp)`` rank grid made at ``init``, and every group split from it.

One :class:`Groups` per context is the only place that creates process
groups: the sp and dp groups of the rank grid, the host (gloo) groups the
ranks agree over, and the grids strategies split the sp group into
(:meth:`Groups.grid`: a 2-D mesh's rows and columns, a composition's head
and sequence axes, a hierarchy's nodes). Grids are made when a layer is
built (``Backend.prepare``) or, at the latest, when the chosen plan is
built — never while strategies are only priced — and cached.

A gloo collective that times out closes its pairs ("Application timeout
caused pair closure"): the group is dead on every rank. :meth:`rebuild`
makes the sp group and its grids again once every rank has agreed on the
error, so a program that catches it can go on (where the world is one sp
group: making groups is collective over the world).

Naming rule (also in docs/architecture.md): a *mesh axis* is an axis of the
rank grid (``dp``, ``sp``, a 2-D mesh's rows and columns); a *dim* is a
tensor dimension (the attention dim, the embed dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import comm
from ._compat import all_gather_single

__all__ = ["Grid", "Groups"]


@dataclass(frozen=True)
class Grid:
    """A group split into a row-major grid of ``shape``.

    ``groups[i]`` holds the ranks that differ from this one only along mesh
    axis ``i``; ``coords`` is this rank's position in the grid.
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    coords: tuple[int, ...]
    groups: tuple[dist.ProcessGroup | None, ...]

    def group(self, name: str) -> dist.ProcessGroup | None:
        return self.groups[self.names.index(name)]


class Groups:
    """The rank grid ``rows`` (row ``i``: the global ranks of one sp group) and the groups made from it.

    ``rows is None`` is a one-process world: every group is ``None`` and collectives have nothing to do.
    """

    def __init__(
        self,
        rows: torch.Tensor | None,
        rank: int,
        device: torch.device,
        timeout: timedelta,
        world_host: dist.ProcessGroup | None = None,
    ):
        self.rows, self.rank, self.device, self.timeout = rows, rank, device, timeout
        self.created: list[dist.ProcessGroup] = [] if world_host is None else [world_host]
        self._grids: dict[tuple, Grid] = {}
        self.world_host = world_host
        if rows is None:
            self.sp = self.dp = self.host = None
            self.sp_rank, self.sp_size, self.dp_rank, self.dp_size = 0, 1, 0, 1
            return
        where = (rows == rank).nonzero()[0].tolist()
        self.dp_rank, self.sp_rank = where
        self.dp_size, self.sp_size = rows.shape
        # Data groups on the world's backend; host groups (gloo) for agreement: never behind GPU work,
        # never paired with a data collective, and waiting twice as long, so that a rank whose data
        # collective timed out still finds the others there to agree on the error.
        self.sp = self._along(rows, 1)
        self.dp = self._along(rows, 0)
        self.host = self._along(rows, 1, backend="gloo", timeout=2 * timeout)

    @classmethod
    def without_groups(cls, size: int, device: torch.device | None = None) -> Groups:
        """A description of ``size`` sp ranks with no process group (pricing and reasons need no more)."""
        groups = cls(None, 0, device or torch.device("cpu"), timedelta(seconds=1))
        groups.sp_size = size
        return groups

    @property
    def mesh(self) -> DeviceMesh | None:
        """The ``("dp", "sp")`` DeviceMesh over the data groups (FSDP2, DTensor)."""
        if self.rows is None:
            return None
        return DeviceMesh.from_group([self.dp, self.sp], self.device.type, mesh=self.rows,
                                     mesh_dim_names=("dp", "sp"))  # fmt: skip

    def sp_members(self) -> list[int]:
        """The global ranks of this rank's sp group, in sp-rank order."""
        return [] if self.rows is None else self.rows[self.dp_rank].tolist()

    def _along(
        self, cube: torch.Tensor, axis: int, *, backend: str | None = None, timeout: timedelta | None = None
    ) -> dist.ProcessGroup:
        """Create every group along ``axis`` of ``cube`` (collective over the world); return this rank's.

        Every rank creates every group, in the same order, so that groups get the world's sequential
        names: a name made from the ranks alone (``use_local_synchronization``) is the same for a group
        made again, and its peers would read the addresses the old one left in the store.
        """
        lines = cube.movedim(axis, -1).reshape(-1, cube.shape[axis]).tolist()
        # Data groups on gloo get a twin that carries their backward's collectives (mosaic.comm).
        twins = backend is None and dist.get_backend() == "gloo"
        mine = None
        for ranks in lines:
            group = dist.new_group(ranks, timeout=timeout or self.timeout, backend=backend)
            twin = dist.new_group(ranks, timeout=timeout or self.timeout, backend=backend) if twins else None
            if self.rank in ranks:
                mine = group
                self.created.append(group)
                if twin is not None:
                    self.created.append(twin)
                    comm.twin_for_backward(group, twin)
        assert mine is not None, "every rank sits on one line of each axis"
        if backend is None and self.device.type == "cuda" and dist.get_backend(mine) == "nccl":
            # Bring the NCCL communicator up now, so the first P2P ring step is not its first use.
            dist.all_reduce(torch.zeros(1, device=self.device), group=mine)
        return mine

    def grid(self, shape: tuple[int, ...], names: tuple[str, ...], group: dist.ProcessGroup | None = None) -> Grid:
        """``group`` (default: the sp group) split into a row-major grid of ``shape``; made once, then cached.

        ``group`` may be any group that every rank of the world holds one of, such as one mesh
        axis of a grid made here (a composition hands its sequence group to an inner strategy this
        way). Making a grid is collective over the world, so every rank asks for the same grids in
        the same order: backends ask for theirs when a layer is built (``Backend.prepare``), or at
        the latest when the chosen plan is built.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(names):
            raise ValueError(f"grid shape {shape} and names {names} differ in length")
        whole = group is None or group is self.sp
        members = self.sp_members() if whole or self.rows is None else dist.get_process_group_ranks(group)
        size = max(1, len(members))
        if math.prod(shape) != size:
            raise ValueError(f"grid shape {shape} has {math.prod(shape)} ranks but the group to split has {size}")
        key = (shape, tuple(names), None if whole else tuple(members))
        if key not in self._grids:
            self._grids[key] = self._make_grid(shape, tuple(names), members, whole)
        return self._grids[key]

    def _make_grid(self, shape: tuple[int, ...], names: tuple[str, ...], members: list[int], whole: bool) -> Grid:
        size = max(1, len(members))
        rank = members.index(self.rank) if members else 0
        coords = tuple(int(c) for c in torch.tensor(range(size)).view(shape).eq(rank).nonzero()[0])
        if self.rows is None:
            return Grid(shape, names, coords, (None,) * len(shape))
        # Every rank's copy of the group, so that all of them create the same groups in the same order.
        lines = self.rows if whole else _gather_groups(members, self.device)
        cube = lines.view(-1, *shape)
        return Grid(shape, names, coords, tuple(self._along(cube, axis + 1) for axis in range(len(shape))))

    def rebuild(self) -> bool:
        """Make the sp group and every grid again (after a gloo timeout closed them); ``False`` if it can't.

        Collective over the world, so it runs only where the world is one sp group (no data-parallel
        replica elsewhere); every rank calls it at the same point, after the agreed error.
        """
        if self.rows is None or self.dp_size != 1:
            return False
        self.sp = self._along(self.rows, 1)
        for key in list(self._grids):
            shape, names, members = key
            self._grids[key] = self._make_grid(shape, names, list(members or self.sp_members()), members is None)
        return True

    def destroy(self, owns_world: bool) -> None:
        """Destroy what was made here (or the whole process group, when Mosaic started it)."""
        if self.rows is None or not dist.is_initialized():
            return
        if owns_world:
            comm.forget(self.created)
            dist.destroy_process_group()
            return
        for group in self.created:
            dist.destroy_process_group(group)
        comm.forget(self.created)
        self.created.clear()


def _gather_groups(mine: list[int], device: torch.device) -> torch.Tensor:
    """Every rank's copy of a group (a tensor collective over the world: object collectives would need numpy)."""
    world = dist.get_world_size()
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = torch.empty(world, dtype=torch.int64, device=where)
    all_gather_single(sizes, torch.tensor([len(mine)], device=where))
    if len(set(sizes.tolist())) != 1:
        raise ValueError(f"the groups to split differ in size between ranks: {sizes.tolist()}")
    every = torch.empty(world * len(mine), dtype=torch.int64, device=where)
    all_gather_single(every, torch.tensor(mine, device=where))
    rows = torch.unique(every.view(world, len(mine)).cpu(), dim=0)
    if rows.numel() != world or sorted(rows.flatten().tolist()) != list(range(world)):
        raise ValueError("the groups to split do not partition the world")
    return rows
