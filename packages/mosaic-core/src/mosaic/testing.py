"""Run a function on N gloo processes, and the references to check it against.

:func:`run_distributed` starts ``N`` worker processes once per ``N`` (they are
reused by later calls), runs ``fn(*args)`` on every rank and returns each
rank's result. An exception on any rank comes back as
:class:`DistributedTestError` with that rank's traceback; a call that does not
finish in time kills the workers (the next call starts fresh ones) and raises
``TimeoutError``. ``fn`` must be a module-level function; its module is
imported in the workers by name, or from its file.

The references compute attention on the unsharded tensor in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TIMEOUT = 300.0
# After one rank fails, the others may be stuck in a collective with it.
_GRACE_AFTER_ERROR = 5.0


class DistributedTestError(RuntimeError):
    """A rank raised; the message carries every failing rank's traceback."""


def _resolve(module: str, qualname: str, path: str | None) -> Callable:
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        if path is None:
            raise
        name = f"_mosaic_task_{abs(hash(path))}"
        obj = sys.modules.get(name)
        if obj is None:
            spec = importlib.util.spec_from_file_location(name, path)
            obj = importlib.util.module_from_spec(spec)
            sys.modules[name] = obj
            spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world: int, init_file: str, conn: Connection, sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
    )
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    import mosaic

    while True:
        task = conn.recv()
        if task is None:
            break
        module, qualname, path, args, kwargs = task
        try:
            result = ("ok", _resolve(module, qualname, path)(*args, **kwargs))
        except BaseException as exc:  # report everything, including assertion failures
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            if mosaic.is_initialized():
                mosaic.shutdown()
        conn.send(result)
    dist.destroy_process_group()


class ProcessPool:
    """``world_size`` gloo worker processes that run functions on every rank."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="mosaic-pool-")
        init_file = os.path.join(self._dir, "init")
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, init_file, child, list(sys.path)), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; the results in rank order."""
        path = getattr(sys.modules.get(fn.__module__), "__file__", None)
        task = (fn.__module__, fn.__qualname__, path, args, kwargs)
        for conn in self._conns:
            conn.send(task)
        results: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self._conns))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    results[rank] = conn.recv()
                except (EOFError, OSError):
                    results[rank] = ("error", f"worker process died (exit code {self._procs[rank].exitcode})")
                del pending[rank]
                if results[rank][0] == "error":
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR)
        errors = {r: res[1] for r, res in sorted(results.items()) if res[0] == "error"}
        if pending or errors:
            self.close(force=True)
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
            raise DistributedTestError(f"{fn.__qualname__} failed on rank(s) {sorted(errors)}:\n{text}")
        if pending:
            raise TimeoutError(
                f"{fn.__qualname__} did not finish within {timeout:.0f} s on rank(s) {sorted(pending)}; "
                "the workers were killed"
            )
        return [results[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if not force and proc.is_alive():
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc in self._procs:
            if force:
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)


_pools: dict[int, ProcessPool] = {}


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any):
    """Run ``fn`` on ``world_size`` reusable gloo processes; results in rank order."""
    if not 1 <= world_size <= 16:
        raise ValueError(f"world_size must be in [1, 16], got {world_size}")
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        pool = _pools[world_size] = ProcessPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        if not pool.alive:
            _pools.pop(world_size, None)


@atexit.register
def close_pools() -> None:
    """Stop every worker process (registered at exit)."""
    while _pools:
        _pools.popitem()[1].close()


def reference_attention(module: nn.Module, x: torch.Tensor, kv: torch.Tensor | None = None, **kwargs: Any):
    """``module`` run on the unsharded input with the ``local`` backend (same weights)."""
    backend = module.backend_name
    module.set_backend("local")
    try:
        return module(x, kv, **kwargs)
    finally:
        module.set_backend(backend)


def mha_reference(
    module: nn.Module,
    x: torch.Tensor,
    kv: torch.Tensor | None = None,
    *,
    kv_len: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """An independent reference: ``nn.MultiheadAttention``'s functional form over the module's axis.

    It uses the module's own parameters, so gradients reach them too. Grouped kv
    heads are repeated into a full multi-head projection, so GQA is checked
    against plain multi-head attention.
    """
    dim = module.attention_axis % x.dim()
    source = x if kv is None else kv
    xq, xs = x.movedim(dim, -2), source.movedim(dim, -2)
    batch_shape = xq.shape[:-2]
    # (seq, batch', embed): the layout F.multi_head_attention_forward expects.
    xq = xq.reshape(-1, *xq.shape[-2:]).transpose(0, 1)
    xs = xs.reshape(-1, *xs.shape[-2:]).transpose(0, 1)
    visible = torch.ones(xq.shape[0], xs.shape[0], dtype=torch.bool, device=x.device)
    if kv_len is not None:
        visible[:, kv_len:] = False
    if causal:
        visible &= torch.ones_like(visible).tril()
    out, _ = F.multi_head_attention_forward(
        xq,
        xs,
        xs,
        module.embed_dim,
        module.num_heads,
        module.in_proj_weight_tensor(repeat_kv=True),
        module.in_proj_bias_tensor(repeat_kv=True),
        None,
        None,
        False,
        0.0,
        module.out_proj.weight,
        module.out_proj.bias,
        training=False,
        need_weights=False,
        attn_mask=~visible,
    )
    out = out.transpose(0, 1)
    return out.reshape(*batch_shape, *out.shape[-2:]).movedim(-2, dim)


def max_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude (at least 1)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    return diff / scale


def compare_with_local(
    backend: str,
    shape: tuple[int, ...],
    attention_axis: int,
    *,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    kv_length: int | None = None,
    kv_len: int | None = None,
    causal: bool = False,
    layout: str = "contiguous",
    mesh_shape: tuple[int, ...] | None = None,
    backend_options: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    autocast: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Run ``backend`` on this rank's shard and ``local`` on the whole tensor; return the errors.

    Call on every rank after :func:`mosaic.init`. The full input, the output
    gradient and the weights come from ``seed`` (identical on all ranks); the
    input is sharded along ``attention_axis`` with ``layout``; ``mesh_shape`` and
    ``backend_options`` go to the module. ``kv_length`` makes
    it cross-attention from a source of that length. Errors (see
    :func:`max_error`) are for the output (``out``), the input and kv gradients
    (``dx``, ``dkv``) and the parameter gradients summed over the sp group
    (``params``). With ``reference_dtype`` the reference runs in that precision
    and the errors of ``local`` in ``dtype`` come back too (``local_*``): the
    single-device error to hold the sharded one against. With ``autocast`` the
    parameters and inputs stay fp32 and ``dtype`` is autocast's compute dtype
    (mixed-precision training); without it, everything is in ``dtype``.
    """
    import mosaic

    ctx = mosaic.get_context()
    device, dim = ctx.device, attention_axis % len(shape)
    torch.manual_seed(seed)
    make = dict(
        embed_dim=shape[-1],
        num_heads=num_heads,
        attention_axis=attention_axis,
        mesh_shape=mesh_shape,
        num_kv_heads=num_kv_heads,
        layout=layout,
        backend_options=backend_options,
    )
    state = mosaic.MultiAxisAttention(**make).state_dict()
    x_full = torch.randn(shape, device=device)
    kv_full = None
    if kv_length is not None:
        kv_full = torch.randn((*shape[:dim], kv_length, *shape[dim + 1 :]), device=device)
    grad_full = torch.randn(shape, device=device)

    def run(name: str, compute_dtype: torch.dtype, sharded: bool) -> dict[str, torch.Tensor | None]:
        mixed = autocast and compute_dtype != torch.float32
        run_dtype = torch.float32 if mixed else compute_dtype
        module = mosaic.MultiAxisAttention(backend=name, **make)
        module.load_state_dict(state)
        module.to(device=device, dtype=run_dtype)
        place = (lambda t: ctx.shard(t, dim, layout)) if sharded else (lambda t: t)
        # Fresh leaves every run: x_full itself must never collect gradients.
        x, grad = (place(t).to(run_dtype).detach().clone() for t in (x_full, grad_full))
        x.requires_grad_()
        kv = None if kv_full is None else place(kv_full).to(run_dtype).detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=compute_dtype, enabled=mixed):
            y = module(x, kv, kv_len=kv_len, causal=causal)
        y.backward(grad.to(y.dtype))
        gather = (lambda t: ctx.unshard(t, dim, layout)) if sharded else (lambda t: t)
        if sharded:
            mosaic.reduce_gradients(module, ctx, average_dp=False)
        got: dict[str, torch.Tensor | None] = {"out": gather(y.detach()), "dx": gather(x.grad)}
        got["dkv"] = None if kv is None else gather(kv.grad)
        got.update({f"param:{n}": p.grad for n, p in module.named_parameters()})
        return got

    def errors(got, want, prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}{key}": max_error(got[key], want[key]) for key in ("out", "dx", "dkv") if want[key] is not None
        }
        out[f"{prefix}params"] = max(max_error(got[k], want[k]) for k in want if k.startswith("param:"))
        return out

    got = run(backend, dtype, sharded=True)
    want = run("local", reference_dtype or dtype, sharded=False)
    result = errors(got, want)
    if reference_dtype is not None:
        result.update(errors(run("local", dtype, sharded=False), want, "local_"))
    return result


def make_problem(
    *, size: int = 1, heads: int = 4, kv_heads: int | None = None, length: int = 16, head_dim: int = 8, **fields: Any
):
    """An :class:`~mosaic.problem.AttentionProblem` with no process group, to check a backend's reasons.

    ``size`` ranks share ``length`` positions (contiguous layout); ``fields``
    override any other field (``mesh_shape``, ``options``, ``causal``, ``context``, ...).
    The default context describes a world of ``size`` ranks that has no groups.
    """
    from datetime import timedelta as _timedelta

    from .context import Context
    from .layout import SeqLayout
    from .problem import AttentionProblem

    layout = SeqLayout.even(length, size)
    values: dict[str, Any] = dict(
        batch=1, heads=heads, kv_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
        dtype=torch.float32, device=torch.device("cpu"), q_layout=layout, kv_layout=layout, rank=0,
        causal=False, kv_len=None, scale=head_dim**-0.5,
        context=Context(torch.device("cpu"), 0, size, 0, size, None, 0, 1, None, None, _timedelta(seconds=1)),
    )  # fmt: skip
    values.update(fields)
    return AttentionProblem(**values)
