"""Mosaic models in PyTorch's own training stack: DDP, FSDP2 and distributed checkpoints.

Mosaic's loss convention: each sp rank's loss is its *share* of its replica's
loss (the shares add up to the replica's loss), so the model's gradient is the
**sum** of the sp ranks' gradients and the **mean** over dp replicas. That is
what :func:`mosaic.reduce_gradients` computes. DDP and FSDP2 average over the
group they reduce over; reduced over all ``dp x sp`` ranks (the way
torchtitan shards over dp x cp) they would divide by ``dp * sp`` and give a
gradient ``sp`` times too small. Summing over that group and dividing by
``dp`` is Mosaic's convention in one collective::

    sum over dp x sp / dp  ==  mean over dp of (sum over sp)

- DDP: ``DistributedDataParallel(model, device_mesh=data_parallel_mesh(ctx))``,
  then :func:`register_ddp_hook` (sums in fp32, divides by dp);
- FSDP2: ``fully_shard(block, mesh=data_parallel_mesh(ctx))`` bottom-up, then
  :func:`set_fsdp_divide_factor`;
- checkpoints of either, or of a plain model: :func:`save_checkpoint` and
  :func:`load_checkpoint` (``torch.distributed.checkpoint``), loadable at
  another sp / dp layout or world size.

docs/training.md says which to use when.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .context import Context, get_context
from .errors import CheckpointError

__all__ = [
    "checkpoint_extra",
    "data_parallel_mesh",
    "load_checkpoint",
    "register_ddp_hook",
    "save_checkpoint",
    "set_fsdp_divide_factor",
]

# The flattened mesh axis's name; torchtitan calls its dp x cp axis "dp_shard_cp".
DP_SP = "dp_sp"


def data_parallel_mesh(context: Context | None = None) -> DeviceMesh:
    """The Context's ``(dp, sp)`` mesh flattened to one axis ``"dp_sp"``: what DDP and FSDP2 reduce over.

    Every rank holds a part of every parameter's gradient (an sp rank from its
    rows, a replica from its tables), so the data-parallel wrapper must reduce
    over all of them. Created collectively on the first call, cached by the
    Context's mesh afterwards.

    Args:
        context: the Mosaic context (default: the one :func:`mosaic.init` made).

    Raises:
        ValueError: in a one-process world started without torch.distributed,
            where DDP and FSDP2 have no process group to use.
    """
    ctx = context or get_context()
    if ctx.mesh is None:
        raise ValueError(
            "DDP and FSDP2 need torch.distributed: launch with torchrun (a one-process world has no process group)"
        )
    # DeviceMesh has no public flatten in torch 2.11-2.13; torchtitan flattens dp x cp with the same call.
    return ctx.mesh._flatten(DP_SP)


@dataclass(frozen=True)
class _HookState:
    group: dist.ProcessGroup
    scale: float


# No annotations on `bucket` and the return value: DDP compares them with dist.GradBucket and
# Future[Tensor] objects, and `from __future__ import annotations` would make them strings.
def _sum_fp32_hook(state: _HookState, bucket):
    """DDP comm hook: sum a ``dist.GradBucket`` over the group in fp32 (fp64 stays fp64), then scale it."""
    buffer = bucket.buffer()
    # A bf16 sum of P gradients adds an error that grows with P; `.to` is a no-op for fp32 buckets.
    wide = buffer.to(torch.promote_types(buffer.dtype, torch.float32))
    future = dist.all_reduce(wide, group=state.group, async_op=True).get_future()

    def finish(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        total = fut.value()[0]
        if state.scale != 1.0:
            total.mul_(state.scale)
        if total is not buffer:
            buffer.copy_(total)
        return buffer

    return future.then(finish)


def register_ddp_hook(model: DistributedDataParallel, context: Context | None = None) -> None:
    """Make ``model`` reduce its gradients as :func:`mosaic.reduce_gradients` does.

    Replaces DDP's averaging with a sum over its group in fp32 followed by a
    division by ``dp_size``: the sum over sp and the mean over dp in one
    all-reduce per bucket, overlapped with the backward as DDP's own. Call it
    once, after wrapping and before the first backward; do not call
    ``reduce_gradients`` as well.

    Args:
        model: a DDP module whose process group holds every rank of the
            Context (``device_mesh=data_parallel_mesh(ctx)``, or the default world
            group).
        context: the Mosaic context (default: the one :func:`mosaic.init` made).

    Raises:
        ValueError: when DDP reduces over fewer ranks than ``dp x sp``; the sp
            ranks' shares would never be summed.
    """
    ctx = context or get_context()
    group = model.process_group
    size = dist.get_world_size(group)
    if size != ctx.dp_size * ctx.sp_size:
        raise ValueError(
            f"DDP reduces over {size} ranks but Mosaic's gradients need all dp x sp = "
            f"{ctx.dp_size} x {ctx.sp_size} ranks: wrap with device_mesh=mosaic.training.data_parallel_mesh(ctx)"
        )
    model.register_comm_hook(_HookState(group, 1.0 / ctx.dp_size), _sum_fp32_hook)


def set_fsdp_divide_factor(model: nn.Module, context: Context | None = None) -> None:
    """Make every ``fully_shard``-ed module of ``model`` reduce-scatter as :func:`mosaic.reduce_gradients` sums.

    FSDP2 divides the reduced gradient by the size of its mesh (``dp x sp``);
    this sets the divisor to ``dp_size`` on every FSDP module, and asks for a
    plain sum followed by that division (gloo has no pre-scaled sum, and
    NCCL's is not needed). Reduction happens in ``MixedPrecisionPolicy``'s
    ``reduce_dtype``: keep it fp32 when ``param_dtype`` is bf16. Call it after
    the last ``fully_shard``.

    Args:
        model: the root module, after ``fully_shard(..., mesh=data_parallel_mesh(ctx))``.
        context: the Mosaic context (default: the one :func:`mosaic.init` made).

    Raises:
        ValueError: when no module is sharded, or a parameter is sharded over
            another number of ranks than ``dp x sp``.
        RuntimeError: on a torch whose FSDP2 cannot be told to sum.
    """
    ctx = context or get_context()
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise RuntimeError(
            f"torch {torch.__version__} has no FSDPModule.set_force_sum_reduction_for_comms; "
            "set_fsdp_divide_factor needs a newer torch (2.13 has it)"
        )
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("no module of the model is fully_shard-ed; call fully_shard before set_fsdp_divide_factor")
    world = ctx.dp_size * ctx.sp_size
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and param.device_mesh.size() != world:
            raise ValueError(
                f"parameter {name} is sharded over {param.device_mesh.size()} ranks, but Mosaic's gradients need "
                f"all dp x sp = {ctx.dp_size} x {ctx.sp_size}: shard with mesh=mosaic.training.data_parallel_mesh(ctx)"
            )
    for module in modules:
        module.set_gradient_divide_factor(float(ctx.dp_size))
        module.set_force_sum_reduction_for_comms(True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_if_one_process() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is not started; here that is the intent."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


@contextlib.contextmanager
def _checkpoint_errors(doing: str, path: Path) -> Iterator[None]:
    """torch's ``CheckpointException`` (a ``BaseException``: ``except Exception`` misses it) as a
    :class:`~mosaic.errors.CheckpointError`, with torch's reasons in the message."""
    try:
        yield
    except CheckpointException as exc:
        raise CheckpointError(f"{doing} the distributed checkpoint {path} failed: {exc}") from exc


def _numpy_imports() -> bool:
    """Whether numpy imports (a broken install counts as missing, as it does for torch)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


_NUMPY_HINT = 'pip install "mosaic-core[training]" (or pip install numpy)'


def _check_numpy() -> None:
    """Refuse before any file or collective: DCP's plan travels in object collectives, which torch decodes with numpy.

    Without numpy, torch raises inside ``dcp.save`` on the rank that decodes the plans while the others
    wait in its collectives until the process group's timeout; checked here, every rank stops at once
    with the same error.
    """
    if dist.is_initialized() and dist.get_world_size() > 1 and not _numpy_imports():
        raise ImportError(
            f"checkpoints of {dist.get_world_size()} processes need numpy, which is not installed: "
            "torch.distributed.checkpoint exchanges its plan as pickled objects and torch decodes them with "
            f"numpy. Install it with {_NUMPY_HINT}"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a distributed checkpoint (a directory) of ``model``, ``optimizer`` and ``extra``; collective.

    ``model`` may be plain (every rank holds the same weights, as after
    :func:`mosaic.reduce_gradients`: each tensor is written once), DDP-wrapped
    or ``fully_shard``-ed (every rank writes its shards). Parameter names are
    those of the unwrapped model, so any of them loads the others'
    checkpoints, at any sp / dp layout and world size. The directory is
    written beside ``path`` and renamed into place, so an interrupted save
    leaves the previous checkpoint. All ranks must see the same filesystem.

    Args:
        path: the checkpoint directory.
        model: the module to save.
        optimizer: its optimizer, whose state is saved by parameter name.
        extra: JSON-serialisable values to keep with it (step, loss history, configuration).

    Raises:
        ImportError: with several processes and no numpy (DCP's object collectives need it):
            ``pip install "mosaic-core[training]"``.
        CheckpointError: when torch's checkpoint fails (a missing key, a shape that differs, ...).
    """
    _check_numpy()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A leftover from an interrupted save may hold shards of another world size.
        _remove(tmp)
    _barrier()
    model_state, optim_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state: dict[str, Any] = {"model": model_state, "extra": json.dumps(extra or {})}
    if optimizer is not None:
        state["optimizer"] = optim_state
    with _quiet_if_one_process(), _checkpoint_errors("saving", path):
        dcp.save(state, checkpoint_id=tmp)
    if rank0:
        # Two renames, so that some complete checkpoint exists at every moment.
        old = path.with_name(path.name + ".old")
        _remove(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _remove(old)
    _barrier()


def _check_checkpoint(path: Path) -> None:
    if not (path / ".metadata").is_file():
        kind = "a file (a torch.save checkpoint?)" if path.is_file() else "not a checkpoint directory"
        raise FileNotFoundError(f"no distributed checkpoint at {path}: it is {kind}")
    _check_numpy()


def checkpoint_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` that :func:`save_checkpoint` kept, without reading any tensor; collective.

    For checks before loading, such as whether the checkpoint is of the model
    about to be built.

    Raises:
        FileNotFoundError: when ``path`` is not a distributed checkpoint.
        ImportError: with several processes and no numpy (DCP's object collectives need it):
            ``pip install "mosaic-core[training]"``.
        CheckpointError: when torch's checkpoint fails (a missing key, a shape that differs, ...).
    """
    path = Path(path)
    _check_checkpoint(path)
    state: dict[str, Any] = {"extra": ""}
    with _quiet_if_one_process(), _checkpoint_errors("reading", path):
        dcp.load(state, checkpoint_id=path)
    return json.loads(state["extra"])


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) from :func:`save_checkpoint`'s directory; returns its ``extra``.

    Collective. Each rank reads what it holds: the whole tensors for a plain
    or DDP model, its shards for a ``fully_shard``-ed one, whatever layout
    wrote them.

    Args:
        path: the checkpoint directory.
        model: the module to load into (plain, DDP or FSDP2).
        optimizer: its optimizer; the checkpoint must hold optimizer state then.

    Raises:
        FileNotFoundError: when ``path`` is not a distributed checkpoint.
        ImportError: with several processes and no numpy (DCP's object collectives need it):
            ``pip install "mosaic-core[training]"``.
        CheckpointError: when torch's checkpoint fails (a missing key, a shape that differs, ...).
    """
    path = Path(path)
    _check_checkpoint(path)
    model_state, optim_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state: dict[str, Any] = {"model": model_state, "extra": ""}
    if optimizer is not None:
        state["optimizer"] = optim_state
    with _quiet_if_one_process(), _checkpoint_errors("loading", path):
        dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        [] if optimizer is None else optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    return json.loads(state["extra"])
