"""Run a function on N gloo processes.

:func:`run_distributed` starts ``N`` worker processes once per ``N`` (they are
reused by later calls), runs ``fn(*args)`` on every rank and returns each
rank's result. An exception on any rank comes back as
:class:`DistributedTestError` with that rank's traceback; a call that does not
finish in time kills the workers (the next call starts fresh ones) and raises
``TimeoutError``. ``fn`` must be a module-level function; its module is
imported in the workers by name, or from its file.
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
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedTestError", "ProcessPool", "close_pools", "run_distributed"]

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


# torch warns at import when numpy is absent. The parent process has already shown that warning (it
# imported torch), so the workers, which import torch before any code of theirs runs, leave it out.
_WORKER_WARNINGS = "ignore:Failed to initialize NumPy:UserWarning"


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """The environment spawned workers start with: the parent's, with torch's numpy warning filtered."""
    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (before, _WORKER_WARNINGS) if w)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = before


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
            with _worker_environment():
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
