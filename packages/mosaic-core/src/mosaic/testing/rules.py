"""The backend contract's rules, checked on a running group: what the standard cases can't see.

:func:`~mosaic.testing.run_conformance` runs these after the cases, on every
rank of each world size, and reports each as a row of its table:

- **equal cost on every rank** — ``Backend.estimate`` of every problem the
  cases planned gives every rank the same :class:`~mosaic.cost.Cost` (``auto``
  ranks strategies on it; ranks that priced differently would choose different
  strategies and hang);
- **no collective while estimating** — pricing makes no process group and runs
  no collective (``auto`` prices every candidate, and ``explain`` prices on
  one rank's call);
- **no key row past kv_len sent** — with the key and value rows at or past
  ``kv_len`` made NaN, no tensor a collective sends holds a NaN, the output and
  query gradients are finite and the gradients of those rows are zero;
- **the same error on every rank** — a collective that fails on one rank
  (injected: it raises instead of running) ends the step with the same error,
  type and message, on every rank, within ``collective_timeout``.

Collectives are watched where backends reach them: the functions of
``torch.distributed`` and the collectives of :mod:`mosaic.comm` (``mosaic.sdk``).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RULES", "check_estimates", "check_injected_error", "check_kv_len_rows"]

RULES = (
    "equal cost on every rank",
    "no collective while estimating",
    "no key row past kv_len sent",
    "the same error on every rank",
)

# What each watched function sends: the positional argument holding the tensor(s) that leave this rank.
_SENT = {
    "all_gather_into_tensor": 1, "all_gather_single": 1, "all_gather": 1, "reduce_scatter_tensor": 1,
    "reduce_scatter_single": 1, "reduce_scatter": 1, "all_to_all_single": 1, "all_to_all": 1, "all_reduce": 0,
    "broadcast": 0, "send": 0, "batch_isend_irecv": 0, "barrier": None, "new_group": None,
    "new_subgroups": None, "all_gather_object": None, "broadcast_object_list": None, "gather": 0, "scatter": 1,
}  # fmt: skip


def _places() -> list[Any]:
    """The modules through which backends call collectives."""
    from .. import _compat, comm

    return [dist, dist.distributed_c10d, _compat, comm]


@contextlib.contextmanager
def _watching(on_call: Callable[[str, tuple, dict, Callable], Any]) -> Iterator[None]:
    """Route every watched collective through ``on_call(name, args, kwargs, original)``."""
    saved = []
    for place in _places():
        for name in _SENT:
            original = getattr(place, name, None)
            if original is None:
                continue

            def wrapper(*args, _name=name, _original=original, **kwargs):
                return on_call(_name, args, kwargs, _original)

            saved.append((place, name, original))
            setattr(place, name, wrapper)
    try:
        yield
    finally:
        for place, name, original in reversed(saved):
            setattr(place, name, original)


_SENT_KEYWORDS = ("input_tensor", "input", "tensor", "input_list", "input_tensor_list", "p2p_op_list")


def _sent_tensors(name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    index = _SENT[name]
    if index is None:
        return []
    value = args[index] if len(args) > index else next((kwargs[k] for k in _SENT_KEYWORDS if k in kwargs), None)
    items = value if isinstance(value, list | tuple) else [value]
    if name == "batch_isend_irecv":  # P2POps: only the sends leave this rank
        return [op.tensor for op in items if getattr(op.op, "__name__", "") == "isend"]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _process_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _cost_digest(cost: Any) -> int:
    return zlib.crc32(repr(cost).encode())


def check_estimates(backend: Any, problems: list[Any], ctx: Any) -> dict[str, str | None]:
    """The first two rules on every problem the cases planned: ``{rule: failure, or None}``."""
    called: list[str] = []

    def refuse(name: str, args: tuple, kwargs: dict, original: Callable) -> Any:
        called.append(name)
        return original(*args, **kwargs)  # run it anyway: the ranks stay in step, the rule reports

    digests = []
    groups_before = _process_groups()
    with _watching(refuse):
        for problem in problems:
            digests.append(_cost_digest(backend.estimate(problem)))
    made = _process_groups() - groups_before
    collective = None
    if called or made:
        what = sorted(set(called)) + ([f"{made} new process group(s)"] if made else [])
        collective = f"estimate ran {', '.join(what)}"
    rows = ctx.gather_ints([zlib.crc32(repr(digests).encode()), len(problems)])
    equal = None
    if len(set(rows)) != 1:
        equal = f"estimate gave the ranks different costs (digests {[r[0] for r in rows]} over {rows[0][1]} problems)"
    return {RULES[0]: equal, RULES[1]: collective}


def check_kv_len_rows(backend: str, options: Mapping[str, Any] | None, ctx: Any) -> str | None:
    """The third rule: NaN key and value rows at or past ``kv_len`` must neither travel nor matter."""
    import mosaic

    total, kv_len = 4 * ctx.sp_size + 3, 2 * ctx.sp_size - 1  # keys end inside a shard; later ranks hold none
    torch.manual_seed(0)
    q, k, v = (ctx.shard(torch.randn(2, 4, total, 8), 2).requires_grad_() for _ in range(3))
    past = ctx.sharded_dim(total, 2).positions() >= kv_len
    with torch.no_grad():
        k[:, :, past], v[:, :, past] = float("nan"), float("nan")
    carried: list[str] = []

    def inspect(name: str, args: tuple, kwargs: dict, original: Callable) -> Any:
        if any(t.is_floating_point() and torch.isnan(t).any() for t in _sent_tensors(name, args, kwargs)):
            carried.append(name)
        return original(*args, **kwargs)

    with _watching(inspect):
        out = mosaic.attention(q, k, v, backend=backend, options=options, kv_len=kv_len)
        out.backward(torch.ones_like(out))
    problems = []
    if carried:
        problems.append(f"{', '.join(sorted(set(carried)))} sent key rows past kv_len")
    if not (torch.isfinite(out).all() and torch.isfinite(q.grad).all()):
        problems.append("the output or dq is not finite: rows past kv_len were computed with")
    if past.any() and (k.grad[:, :, past].abs().sum() != 0 or v.grad[:, :, past].abs().sum() != 0):
        problems.append("the gradients of rows past kv_len are not zero")
    verdicts = ctx.gather_ints([int(bool(problems))])
    if not problems and any(r[0] for r in verdicts):
        problems.append("another rank sent or used key rows past kv_len")
    return "; ".join(problems) or None


def check_injected_error(backend: str, options: Mapping[str, Any] | None, ctx: Any) -> tuple[str, str]:
    """The fourth rule, on one rank's view: a step in which the last rank's first collective fails.

    Returns what this rank raised (type and message; ``("", "")`` when it raised nothing; ``("skip",
    why)`` when the backend can't run the rule's layer). The caller compares the ranks' answers: every
    rank must raise, the same error.
    """
    import mosaic

    layer = mosaic.MultiAxisAttention(16, 4, 1, backend=backend, backend_options=dict(options or {}))
    x = ctx.shard(torch.randn(2, 4 * ctx.sp_size + 1, 3, 16), 1).requires_grad_()
    try:
        layer(x).sum().backward()  # plans, agreed: the step below meets cached plans only
    except mosaic.BackendNotSupported as exc:
        return "skip", f"the rule's layer can't run here: {str(exc).splitlines()[-1].strip()}"
    injected = ctx.sp_rank == ctx.sp_size - 1
    failed: list[str] = []

    def fail_once(name: str, args: tuple, kwargs: dict, original: Callable) -> Any:
        if injected and not failed and name not in ("new_group", "new_subgroups"):
            failed.append(name)
            raise RuntimeError(f"injected failure of {name} on sp rank {ctx.sp_rank} (conformance)")
        return original(*args, **kwargs)

    try:
        with _watching(fail_once):
            layer(x).sum().backward()
            ctx.step()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""
