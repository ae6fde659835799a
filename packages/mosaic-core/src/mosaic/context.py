"""``mosaic.init`` and the :class:`Context` it returns: one object per process, split by concern.

A Context holds, each in a room of its own,

- where this process sits: device, ranks, the ``(dp, sp)`` rank grid and every
  process group Mosaic made (:class:`~mosaic.groups.Groups`);
- how the ranks agree (:class:`~mosaic.agreement.Agreement` over the sp group,
  and one over the world for ``reduce_gradients``);
- which dims of the model's tensors are sharded (:class:`~mosaic.declarations.Declarations`);
- the calls seen so far, by their facts, and the plans made, by their problem (:class:`~mosaic.plans.PlanCache`).

Ranks form a grid ``(dp, sp)``: the ``sp`` ranks of one row share the sharded
dim (contiguous global ranks, so on one node where possible), the ``dp`` rows
are data-parallel replicas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import comm
from . import layout as _layout
from ._compat import all_gather_single
from .agreement import FAILED, INIT, STEP, Agreement, lost, site_id
from .declarations import Declarations, ShardedDim
from .errors import RULE, CallMismatchError
from .groups import Grid, Groups, _gather_groups
from .layout import LayoutKind, SeqLayout
from .plans import PlanCache

__all__ = [
    "CHECKS",
    "DEFAULT_COLLECTIVE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "Context",
    "get_context",
    "init",
    "is_initialized",
    "shutdown",
]

DEFAULT_TIMEOUT = timedelta(minutes=5)
# Ranks arrive at a collective within a step's imbalance of each other: one that has not arrived
# after a minute is not coming.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(seconds=60)
CHECKS = ("per_step", "every_call")
Checks = Literal["per_step", "every_call"]
# torch's own hang diagnosis, on unless the user set them: NCCL errors abort the process instead of
# hanging it, and the flight recorder dumps every rank's last collectives when one times out.
_HANG_DIAGNOSIS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_FR_BUFFER_SIZE": "2000",  # the flight recorder (torch >= 2.8; TORCH_NCCL_TRACE_BUFFER_SIZE before)
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}

_context: Context | None = None


@dataclass(eq=False)
class Context:
    """Where this process sits and what Mosaic keeps for it (see the module docstring).

    Attributes:
        device: this process's device.
        rank: this process's rank in the world group.
        world_size: ranks in the world group.
        groups: every process group of Mosaic's (``sp_group``, ``dp_group``, the grids).
        agreement: how the sp ranks agree (plans, steps, failures); ``world_agreement`` the world's.
        declarations: the sharded dims of the model's tensors (``shard``, ``sharded_dim``).
        timeout: the process group's timeout.
        collective_timeout: Mosaic's own collectives' timeout (the agreement waits twice as long).
        checks: ``"per_step"`` or ``"every_call"`` (:func:`init`).
    """

    device: torch.device
    rank: int
    world_size: int
    groups: Groups
    timeout: timedelta = DEFAULT_TIMEOUT
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT
    checks: Checks = "per_step"
    owns_process_group: bool = field(default=False, repr=False)
    agreement: Agreement = field(init=False, repr=False)
    world_agreement: Agreement = field(init=False, repr=False)
    declarations: Declarations = field(init=False, repr=False)
    # A call's facts -> its agreed problem and plan (what a cached call runs, with no exchange) ...
    calls: PlanCache = field(init=False, repr=False, default_factory=PlanCache)
    # ... and a problem -> its backend's plan (calls that agree on the same problem share one), and the plans
    # compositions run inside theirs.
    plans: PlanCache = field(init=False, repr=False, default_factory=PlanCache)
    inner_plans: PlanCache = field(init=False, repr=False, default_factory=PlanCache)

    def __post_init__(self) -> None:
        g = self.groups
        self.agreement = Agreement(g.host, g.sp_rank, g.sp_size, 2 * self.collective_timeout)
        self.world_agreement = Agreement(g.world_host, self.rank, self.world_size, 2 * self.collective_timeout,
                                         "world")  # fmt: skip
        self.declarations = Declarations(g.sp_rank, g.sp_size)
        self.agreement.on_broken = self._recover

    # -- where this rank sits -----------------------------------------------------------------

    @property
    def sp_rank(self) -> int:
        return self.groups.sp_rank

    @property
    def sp_size(self) -> int:
        return self.groups.sp_size

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.groups.sp

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank

    @property
    def dp_size(self) -> int:
        return self.groups.dp_size

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.groups.dp

    @property
    def mesh(self) -> DeviceMesh | None:
        """The ``("dp", "sp")`` DeviceMesh (``None`` in a one-process world started without a launcher)."""
        return self.groups.mesh

    def grid(self, shape: tuple[int, ...], names: tuple[str, ...], group: dist.ProcessGroup | None = None) -> Grid:
        """``group`` (default: the sp group) split into a row-major grid of ``shape`` (:meth:`Groups.grid`)."""
        return self.groups.grid(shape, names, group)

    # -- sharded dims -------------------------------------------------------------------------

    def layout(self, total: int, layout: LayoutKind = "contiguous") -> SeqLayout:
        """How ``total`` positions are spread over the sp group by :meth:`shard`."""
        return SeqLayout.even(total, self.sp_size, layout)

    def shard(
        self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous", *, declare: bool = True
    ) -> torch.Tensor:
        """This rank's part of a full tensor along ``dim`` (uneven lengths as ``tensor_split``).

        With ``declare`` (the default) it records that dim ``dim`` of ``x.shape[dim]``
        positions is sharded with ``layout`` (:mod:`mosaic.declarations`), so that a layer
        attending over it with ``backend="local"``, or over a dim that is not sharded with a
        distributed backend, raises instead of computing the wrong thing.
        """
        dim = _dim(x, dim)
        if declare:
            self.declarations.declare(dim, x.shape[dim], layout)
        return _layout.shard(x, dim, self.sp_rank, self.sp_size, layout)

    def sharded_dim(self, total: int, dim: int | None = None, layout: LayoutKind = "contiguous") -> ShardedDim:
        """Where this rank's part of a dim of ``total`` positions sits (:class:`mosaic.sharded.ShardedDim`).

        With ``dim`` it also declares that dim sharded (:meth:`declare_sharded`), for model code that
        draws or loads its own rows instead of calling :meth:`shard`. ``total`` may be smaller than the
        number of ranks: the last ranks then hold no position.
        """
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a non-negative int (the positions of the whole dim), got {total!r}")
        if dim is not None:
            self.declare_sharded(dim, layout, total=total)
        return ShardedDim.of(total, self.sp_rank, self.sp_size, layout, self.sp_group)

    def declare_sharded(self, dim: int, layout: LayoutKind | None = "contiguous", *, total: int | None = None) -> None:
        """Declare that model tensors are sharded along ``dim`` (from the front) with ``layout``.

        For tensors sharded by hand (each rank loads or draws its own rows); ``layout=None``
        withdraws the declaration. With ``total`` (the positions of the whole dim) every rank's
        length follows from it, so sharded calls over the dim need no exchange once planned
        (:meth:`sharded_dim` declares it so); without it every call over the dim agrees on them.
        """
        if layout is None:
            self.declarations.withdraw(dim)
        else:
            self.declarations.declare(dim, total, layout)

    def unshard(self, x: torch.Tensor, dim: int, layout: LayoutKind = "contiguous") -> torch.Tensor:
        """The full tensor from every rank's part along ``dim``; collective over the sp group.

        Differentiable under Mosaic's loss convention (each rank's loss is a share of the total):
        the gradient of this rank's part sums every rank's gradient of the full tensor at those rows.
        """
        if self.sp_group is None or self.sp_size == 1:
            return x
        dim = _dim(x, dim)
        # Always exchanged: a shortcut taken on some ranks only would pair different collectives.
        sizes = self.gather_sizes(x.shape[dim])
        return _Unshard.apply(x, sizes, dim, layout, self.sp_group)

    def gather_sizes(self, local: int) -> list[int]:
        """Every sp rank's value of the integer ``local`` (a small all-gather over the sp group)."""
        return [row[0] for row in self.gather_ints([local])]

    def gather_ints(self, values: list[int]) -> list[tuple[int, ...]]:
        """Every sp rank's ``values`` (the same count on every rank), in sp-rank order: one small all-gather."""
        if self.sp_group is None or self.sp_size == 1:
            return [tuple(int(v) for v in values)]
        where = self.device if dist.get_backend(self.sp_group) == "nccl" else torch.device("cpu")
        mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=where)
        out = torch.empty(self.sp_size * mine.numel(), dtype=torch.int64, device=where)
        comm.blocking(lambda: all_gather_single(out, mine, group=self.sp_group))
        return [tuple(row) for row in out.view(self.sp_size, -1).tolist()]

    # -- agreement ----------------------------------------------------------------------------

    def step(self, index: int | None = None) -> None:
        """Agree on every sharded call since the last agreement, and on the loop's step ``index`` when given.

        A backward pass through a sharded layer and ``reduce_gradients`` agree on the calls by
        themselves; call this once per step of a loop that has neither (inference), so that a rank
        that skipped a call is named there. With ``index`` (the loop's counter) a rank that skipped a
        whole step — a forward and its backward, whose facts match the next step's — is named too:
        nothing else tells that step from the next.
        """
        facts = [] if index is None else [int(index)]
        rows = self.agreement.round(STEP, "ctx.step()", facts, site=site_id("ctx.step"))
        if len(set(rows)) != 1:
            steps = ", ".join(f"rank {r}: {row[0] if row else None}" for r, row in enumerate(rows))
            raise CallMismatchError(
                f"the ranks of the sp group are at different steps of their loop (ctx.step: {steps}): a rank skipped "
                f"a step (or counts them differently), so its sharded calls met the others' of another step. {RULE}"
            )

    def fail(self, exc: BaseException, what: str, phase: str) -> BaseException:
        """A call failed on this rank (``exc``): the error every rank raises, once they have agreed on it.

        A collective that timed out (a peer did not come) sends no error of its own: every rank then
        raises the error another rank sent, or the mismatch of where the ranks are. Groups a gloo
        timeout closed are made again and plans forgotten, so a program that catches it can go on.
        """
        timed_out = lost(exc)
        try:
            self.agreement.round(FAILED, f"the {phase} of {what}", error=None if timed_out else exc,
                                 site=site_id("failed"))  # fmt: skip
        except BaseException as agreed:  # the round always raises the agreed error (and made the groups again)
            if agreed.__cause__ is None:
                agreed.__cause__ = exc
            agreed.mosaic_agreed = True  # type: ignore[attr-defined]
            return agreed
        raise AssertionError("a failure round always raises")

    def _recover(self) -> None:
        # A backward that failed midway left its routing behind: what follows runs outside any call.
        comm.set_serving(None)
        comm.set_backward(False)
        if self.sp_group is not None and dist.get_backend(self.sp_group) == "gloo":
            self.groups.rebuild()
        self.calls.clear()
        self.plans.clear()
        self.inner_plans.clear()


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


class _Unshard(torch.autograd.Function):
    """All-gather along a dim; the backward reduce-scatters the gradient (fp32) back to the parts' owners."""

    @staticmethod
    def forward(ctx, x, sizes: list[int], dim: int, layout: str, group):
        ctx.sizes, ctx.dim, ctx.layout, ctx.group = sizes, dim, layout, group
        full = comm.all_gather_uneven(x, sizes, dim, group)
        return _layout.unshard(list(full.split(sizes, dim)), dim, layout)

    @staticmethod
    def backward(ctx, grad):
        p = len(ctx.sizes)
        rank_major = torch.cat([_layout.shard(grad, ctx.dim, r, p, ctx.layout) for r in range(p)], ctx.dim)
        wide = torch.promote_types(grad.dtype, torch.float32)
        summed = comm.reduce_scatter_uneven(rank_major, ctx.sizes, ctx.dim, ctx.group, wide)
        return summed.to(grad.dtype), None, None, None, None


def get_context() -> Context:
    """The context :func:`init` created; a clear error before it (call ``mosaic.init(sp_size=...)`` first)."""
    if _context is None:
        raise RuntimeError(
            "Mosaic is not initialised: call mosaic.init(sp_size=...) first (under torchrun for several processes)"
        )
    return _context


def is_initialized() -> bool:
    """Whether :func:`init` has made the context (and :func:`shutdown` has not forgotten it)."""
    return _context is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def _seconds(value: Any, name: str) -> timedelta:
    """``value`` (seconds, or a timedelta) as a positive timedelta; a ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        delta = timedelta(seconds=value)
    else:
        raise TypeError(f"{name} must be seconds (an int or float) or a datetime.timedelta, got {value!r}")
    if delta.total_seconds() <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return delta


def init(
    sp_size: int | None = None,
    *,
    backend: str | None = None,
    mesh: DeviceMesh | None = None,
    sp_group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    timeout: timedelta | float = DEFAULT_TIMEOUT,
    collective_timeout: timedelta | float = DEFAULT_COLLECTIVE_TIMEOUT,
    checks: Checks = "per_step",
) -> Context:
    """Set up Mosaic's process groups and return the :class:`Context`.

    Args:
        sp_size: ranks that share the sharded dim (default 1, or the size of
            ``mesh``/``sp_group``); ``world_size % sp_size`` must be 0, the rest is
            data parallel.
        backend: process-group backend when Mosaic starts torch.distributed
            (default: ``nccl`` on CUDA, ``gloo`` on CPU; ``gloo`` with a CUDA device puts
            several ranks on one GPU, for tests).
        mesh: an existing ``DeviceMesh`` with an ``"sp"`` dim (and optionally ``"dp"``),
            or a 1-D mesh used as the sp group.
        sp_group: an existing process group to use as the sp group.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout: timeout of the process group when Mosaic starts it (the world group, which
            DDP and the user's own collectives use); seconds or a timedelta.
        collective_timeout: how long a rank waits for the others in Mosaic's own data
            collectives (the strategies' transfers) before the ranks agree on what went
            wrong and raise it together (the agreement itself waits twice as long); seconds or
            a timedelta. Well under ``timeout``: a rank that skipped a call or a backward, or
            raised and went on, is reported in a minute, not after the process-group timeout.
        checks: ``"per_step"`` (default): the ranks agree when a plan is made and once per
            step on every call since (:mod:`mosaic.agreement`), so a call whose plan is cached
            runs no host exchange; a disagreement raises the same error on every rank within
            the step, or within ``collective_timeout`` when it stalls a collective.
            ``"every_call"`` (debug): every sharded call and its backward start with an
            agreement, so a disagreement raises at that call.

    Every rank must pass the same arguments: they are compared across the world
    first, and a mismatch raises the same error on every rank. Without
    torchrun's environment and without an initialised process group this is a
    one-process world and needs no process group. If ``init`` fails, it leaves
    no process group behind that it started. When Mosaic starts the process group it
    turns on torch's hang diagnosis where the environment does not set it: NCCL errors
    abort (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) and the flight recorder dumps the last
    collectives of every rank on a timeout (``TORCH_FR_BUFFER_SIZE``,
    ``TORCH_NCCL_DUMP_ON_TIMEOUT``).
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
    timeout = _seconds(timeout, "timeout")
    collective_timeout = _seconds(collective_timeout, "collective_timeout")
    device = _pick_device(device)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not dist.is_initialized() and not launched and mesh is None and sp_group is None:
        if sp_size not in (None, 1):
            raise ValueError(
                f"sp_size={sp_size} needs {sp_size} processes, but this is a one-process world; "
                f"launch with torchrun --nproc_per_node={sp_size}"
            )
        groups = Groups(None, 0, device, collective_timeout)
        _context = Context(device, 0, 1, groups, timeout, collective_timeout, checks)
        return _context
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        for name, value in _HANG_DIAGNOSIS.items():
            os.environ.setdefault(name, value)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        store, rank, world = _store(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
        owns = True
    try:
        ctx = _build(sp_size, mesh, sp_group, device, timeout, collective_timeout, checks, owns)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    _context = ctx
    return ctx


_rendezvous: tuple[dist.Store, int, int] | None = None
_generation = 0


def _store(timeout: timedelta) -> tuple[dist.Store, int, int]:
    """The launcher's store (made once per process), under a prefix of its own for each process group Mosaic starts.

    A process group started again after ``shutdown`` numbers its groups from 0 again; under the same
    keys its peers would read the addresses the last one left in the store and fail to connect.
    """
    global _rendezvous, _generation
    if _rendezvous is None:
        _rendezvous = next(dist.rendezvous("env://", timeout=timeout))
    store, rank, world = _rendezvous
    _generation += 1
    return dist.PrefixStore(f"mosaic/{_generation}", store), rank, world


def _build(sp_size, mesh, sp_group, device, timeout, collective_timeout, checks, owns) -> Context:
    rank, world = dist.get_rank(), dist.get_world_size()
    # One agreement mechanism: a host group of the world compares init's arguments before any other group
    # exists. Ranks arrive at init at different times (loading data, a model), so it waits as long as the
    # process group does.
    arguments = Agreement(dist.new_group(list(range(world)), backend="gloo", timeout=timeout), rank, world,
                          timeout, "world")  # fmt: skip
    world_host = dist.new_group(list(range(world)), backend="gloo", timeout=2 * collective_timeout)
    mode = 0 if mesh is None and sp_group is None else (1 if mesh is not None else 2)
    shape = 0 if mesh is None else site_id(repr((mesh.mesh.tolist(), mesh.mesh_dim_names)))
    mine = [-1 if sp_size is None else sp_size, mode, shape, ("cpu", "cuda").index(device.type),
            int(collective_timeout.total_seconds() * 1000), CHECKS.index(checks)]  # fmt: skip
    table = arguments.round(INIT, "mosaic.init", mine, site=site_id("init"))
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
    # A mesh or group given by the user only says which ranks share the sp group: Mosaic makes groups of
    # its own over them, so that its collectives never interleave with the user's and it can remake them.
    rows = _sp_rows(world, sp_size, mesh, sp_group, device)
    groups = Groups(rows, rank, device, collective_timeout, world_host)
    groups.created.append(arguments.group)
    return Context(device, rank, world, groups, timeout, collective_timeout, checks, owns)


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
        rows = _gather_groups(dist.get_process_group_ranks(sp_group), device)
    else:
        sp = 1 if sp_size is None else sp_size
        if sp < 1 or world % sp != 0:
            raise ValueError(f"world_size {world} is not divisible by sp_size {sp}")
        rows = torch.arange(world).view(world // sp, sp)
    if sp_size is not None and rows.shape[1] != sp_size:
        raise ValueError(f"sp_size={sp_size} but the given sp group has {rows.shape[1]} ranks")
    return rows


def shutdown() -> None:
    """Forget the context; tear down the process group if :func:`init` created it, else the groups it made.

    ``init`` may be called again afterwards.
    """
    global _context
    ctx, _context = _context, None
    comm.set_serving(None)
    comm.set_backward(False)
    if ctx is not None:
        ctx.groups.destroy(ctx.owns_process_group)
