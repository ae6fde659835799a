"""``mosaic.attention``: attention on projected ``(batch, heads, seq_local, head_dim)`` tensors.

This is the whole call path; ``MultiAxisAttention`` is projections around it.

1. Facts. Each rank describes its input (lengths along the sequence dim,
   batch, heads, dtype, ``kv_len``, ``causal``, layout, the backend and its
   options, ...). For a distributed backend the ranks of the sp group agree on
   them in one guarded host collective (:mod:`mosaic.guard`): a local failure
   or a disagreement raises the same error on every rank.
2. Plan. The backend plans from the agreed :class:`~mosaic.problem.AttentionProblem`;
   plans are cached by the facts that decide them, so a repeated shape only
   executes.
3. Execute. The plan runs collectives and kernels. Its backward starts with a
   guarded exchange too, so a rank that skips a backward makes every rank
   raise instead of waiting.

Under ``torch.compile`` a distributed call is one graph break (its
collectives run eagerly, in order on every rank); the ``local`` backend is
traced as plain ``scaled_dot_product_attention`` and needs none.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backend import Backend, Plan
from .context import Context, get_context
from .errors import RULE, CollectiveTimeout
from .guard import BACKWARD, FORWARD, HELPER, Guard, site_id
from .kernels import default_scale
from .layout import LAYOUTS, LayoutKind, SeqLayout, check_layout
from .options import Options
from .problem import (
    DTYPES,
    AttentionProblem,
    check_kv_len,
    dtype_code,
    float_bits,
    kv_len_int,
    layout_code,
)
from .registry import get_backend

__all__ = ["Call", "agreed_problem", "attend", "attention", "plan_for", "prepare_backend"]

# Plans of processes without a context (the local backend), least recently used first.
_PLANS: OrderedDict[tuple, Plan] = OrderedDict()
_MAX_PLANS = 512

# The columns of a forward guard row, and what a disagreement in each means.
_FACTS = (
    "query rows",
    "key rows",
    "batch (all dims but the attention dim and embed, folded)",
    "heads",
    "kv heads",
    "head dim",
    "kv_len",
    "causal",
    "dtype",
    "device type",
    "layout",
    "softmax scale",
    "dropout",
    "backend",
    "backend options",
    "batch shape (the folded dims)",
    "sharding declaration of the attention dim",
)
_PER_RANK = 2  # query and key rows may differ between ranks
_DEVICES = ("cpu", "cuda")
UNCHECKED = -1  # a sharding-declaration fact that is not checked (mosaic.attention: the call says it all)


@dataclass(frozen=True)
class Call:
    """What a caller asks of one attention call, besides the tensors."""

    backend: Backend
    options: Options
    kv_len: int | None = None
    causal: bool = False
    layout: str = "contiguous"
    scale: float | None = None
    dropout: float = 0.0
    batch_shape: tuple[int, ...] = ()
    what: str = "mosaic.attention"
    declared: int = UNCHECKED  # 0: the attention dim is not declared sharded; 1 + layout code: it is


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | Backend = "local",
    options: Mapping[str, Any] | Options | None = None,
    kv_len: int | None = None,
    causal: bool = False,
    layout: LayoutKind = "contiguous",
    scale: float | None = None,
    dropout: float = 0.0,
    context: Context | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` along dim 2, sharded over the sp group by ``backend``.

    Args:
        q: ``(batch, heads, q_rows, head_dim)``: this rank's query rows (with a distributed
            backend, its shard of the sequence; any lengths, zero included).
        k, v: ``(batch, kv_heads, k_rows, head_dim)``, ``heads % kv_heads == 0`` (GQA/MQA).
            Keys from the same rows as the queries (self-attention), another sequence
            sharded the same way (cross-attention, a K/V cache), or, with ``backend="local"``,
            keys every rank holds whole (inducing points, a replicated cache).
        backend: a name from ``mosaic.available_backends()``, ``"auto"``, or a Backend.
        options: the backend's options (``mosaic.get_backend(name).Options`` lists them).
        kv_len: only keys at global positions ``< kv_len`` are attended (TabPFN's training
            rows); ints, numpy integers and 0-d integer tensors.
        causal: query ``i`` attends to keys ``j <= i`` (global positions).
        layout: how the sequence is spread over the ranks (``"contiguous"``, ``"zigzag"``).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        dropout: attention dropout probability (``local`` only).
        context: the :class:`~mosaic.Context` (default: the one ``mosaic.init`` made).
        name: how errors name this call (default ``"mosaic.attention"``).

    Returns:
        ``(batch, heads, q_rows, head_dim)`` in q's dtype; differentiable in q, k and v.
    """
    chosen = backend if isinstance(backend, Backend) else get_backend(backend)
    check_layout(layout)
    what = name or f"mosaic.attention(backend={chosen.name!r})"
    call = Call(chosen, chosen.parse_options(options), None, bool(causal), layout, scale, float(dropout),
                (q.shape[0],), what)  # fmt: skip
    try:
        call = dataclasses.replace(call, kv_len=kv_len_int(kv_len))
    except TypeError as exc:  # a kv_len of the wrong type on one rank: every rank must hear of it
        return attend(None, None, None, call, context, error=exc)
    return attend(q, k, v, call, context)


def attend(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    call: Call,
    context: Context | None = None,
    *,
    error: BaseException | None = None,
    extra_facts: Sequence[int] = (),
    layouts: Callable[[list[tuple[int, ...]]], tuple[SeqLayout, SeqLayout]] | None = None,
) -> torch.Tensor:
    """:func:`attention` for callers that check or describe more (modules).

    Args:
        error: the caller's own input check failed on this rank (q, k, v are then
            ``None``); with a distributed backend every rank raises it.
        extra_facts: more integers the ranks must agree on (after the standard ones).
        layouts: builds ``(q_layout, kv_layout)`` from the agreed rows (every rank's
            facts, ``extra_facts`` included), for layouts beyond contiguous/zigzag.
    """
    if not call.backend.capabilities.distributed:
        if error is not None:
            raise error
        if torch.compiler.is_compiling() and call.backend.name == "local":
            if getattr(call.options, "kernel", None) is None:
                return _traced_local(q, k, v, call)
            return _planned_local(q, k, v, call)  # a named kernel runs as it is: one graph break
        return plan_for(call.backend, agreed_problem(q, k, call, None))(q, k, v)
    return _distributed(q, k, v, call, context or get_context(), error, extra_facts, layouts)


@torch.compiler.disable
def _planned_local(q, k, v, call: Call) -> torch.Tensor:
    return plan_for(call.backend, agreed_problem(q, k, call, None))(q, k, v)


@torch.compiler.disable
def _distributed(q, k, v, call: Call, ctx: Context, error, extra_facts, layouts) -> torch.Tensor:
    # The guard, the plan and the collectives run eagerly, in the same order on every rank:
    # under torch.compile a sharded call is one graph break.
    problem = agreed_problem(q, k, call, ctx, error=error, extra_facts=extra_facts, layouts=layouts)
    plan = plan_for(call.backend, problem, ctx)
    if ctx.guard.size > 1 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        guard = ctx.guard if ctx.checks == "every_call" else None
        return _Guarded.apply(plan, guard, call.what, q, k, v)
    return _execute(plan, q, k, v, call.what)


def agreed_problem(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    call: Call,
    context: Context | None,
    *,
    error: BaseException | None = None,
    extra_facts: Sequence[int] = (),
    layouts: Callable[[list[tuple[int, ...]]], tuple[SeqLayout, SeqLayout]] | None = None,
) -> AttentionProblem:
    """The problem of one call: agreed over the sp group of ``context``, or from local facts without one.

    A local failure (``error``, or facts that do not fit) or a disagreement raises
    the same error on every rank of the group.
    """
    facts: list[int] = []
    if error is None:
        try:
            facts = _facts(q, k, call) + [int(f) for f in extra_facts]
        except (TypeError, ValueError) as exc:
            error = exc
    if context is None:
        if error is not None:
            raise error
        q_layout, kv_layout = SeqLayout((q.shape[2],)), SeqLayout((k.shape[2],))
        return _problem(q, k, call, q_layout, kv_layout, 0, None)
    remembered = (call.what, tuple(facts))
    if context.checks == "on_change" and error is None and remembered in context.agreed:
        return context.agreed[remembered]
    rows = context.guard.agree(FORWARD, call.what, facts, error, site=site_id(call.what))
    for column in range(_PER_RANK, len(_FACTS)):
        values = [r[column] for r in rows]
        if len(set(values)) != 1:
            raise ValueError(_disagreement(column, values, context.guard.name))
    declared = rows[0][len(_FACTS) - 1]
    if declared != UNCHECKED and len(rows) > 1:
        _check_declaration(declared, call)
    if layouts is not None:
        q_layout, kv_layout = layouts(rows)
    else:
        q_layout = SeqLayout(tuple(r[0] for r in rows), call.layout)
        kv_layout = SeqLayout(tuple(r[1] for r in rows), call.layout)
    problem = _problem(q, k, call, q_layout, kv_layout, context.guard.rank, context)
    if context.checks == "on_change":
        context.agreed[remembered] = problem
    return problem


def _problem(q, k, call: Call, q_layout: SeqLayout, kv_layout: SeqLayout, rank: int, ctx) -> AttentionProblem:
    check_kv_len(call.kv_len, kv_layout.total)
    b, h, _, d = q.shape
    return AttentionProblem(
        batch=b,
        heads=h,
        kv_heads=k.shape[1],
        head_dim=d,
        dtype=q.dtype,
        device=q.device,
        q_layout=q_layout,
        kv_layout=kv_layout,
        rank=rank,
        causal=call.causal,
        kv_len=call.kv_len,
        scale=default_scale(d) if call.scale is None else call.scale,
        dropout=call.dropout,
        cross=q_layout != kv_layout,
        options=call.options,
        batch_shape=call.batch_shape,
        context=ctx,
        group=None if ctx is None else ctx.sp_group,
    )


def _facts(q: torch.Tensor, k: torch.Tensor, call: Call) -> list[int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, length, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % max(k.shape[1], 1):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: batch and head dim must match, "
                         "and the query heads must be a multiple of the kv heads")  # fmt: skip
    scale = default_scale(d) if call.scale is None else call.scale
    return [
        length, k.shape[2], b, h, k.shape[1], d, -1 if call.kv_len is None else call.kv_len, int(call.causal),
        dtype_code(q.dtype), _DEVICES.index(q.device.type) if q.device.type in _DEVICES else len(_DEVICES),
        layout_code(call.layout), float_bits(scale), float_bits(call.dropout), site_id(call.backend.name),
        call.options.digest(), site_id(repr(call.batch_shape)), call.declared,
    ]  # fmt: skip


def _disagreement(column: int, values: list[int], group: str) -> str:
    name = _FACTS[column]
    if name == "dtype":
        values = [str(DTYPES[v]) if v >= 0 else "other" for v in values]  # type: ignore[misc]
    elif name == "layout":
        values = [LAYOUTS[v] if v < len(LAYOUTS) else "other" for v in values]  # type: ignore[misc]
    elif name == "kv_len":
        values = [None if v == -1 else v for v in values]  # type: ignore[misc]
    elif name in ("backend", "backend options", "softmax scale", "dropout", "batch shape (the folded dims)"):
        return (
            f"attention calls disagree across the {group} group: the {name} differ between ranks "
            f"(digests {values}); every rank must build the layer the same way (same backend, options, "
            "scale, dropout) and pass the same shapes except along the attention dim"
        )
    elif name == "sharding declaration of the attention dim":
        return (
            f"the ranks of the {group} group declare the attention dim differently ({values}: 0 = not sharded, "
            "1 = contiguous, 2 = zigzag); declare it the same way on every rank (ctx.shard / ctx.declare_sharded)"
        )
    return (
        f"attention inputs disagree across the {group} group: {name} is {values} on {group} ranks "
        f"0..{len(values) - 1}; every rank must pass the same shapes except along the attention dim"
    )


def _check_declaration(declared: int, call: Call) -> None:
    if declared == 0:
        raise ValueError(
            f"{call.what} shards its attention dim with backend {call.backend.name!r}, but that dim is not "
            "declared sharded: shard the input with ctx.shard(x, dim) (or declare a tensor you sharded yourself "
            "with ctx.declare_sharded(dim)); if the dim is whole on every rank, use backend='local'"
        )
    declared_layout = LAYOUTS[declared - 1] if declared <= len(LAYOUTS) else "a 2-D grid"
    if declared_layout != call.layout:
        raise ValueError(
            f"{call.what} expects layout={call.layout!r}, but its attention dim was sharded with layout="
            f"{declared_layout!r} (ctx.shard(x, dim, {declared_layout!r})); build the layer with "
            f"layout={declared_layout!r} or shard with layout={call.layout!r}"
        )


def prepare_backend(backend: Backend, options: Options, context: Context, what: str) -> None:
    """Check that every rank of the sp group chose this backend and options, then let it create its groups.

    Group creation is collective over the world: ranks with different options would
    create different groups and hang there, so they compare first and all raise.
    """
    facts = [site_id(backend.name), options.digest()]
    # One site for every build, so that ranks building different layers compare their facts.
    rows = context.guard.agree(HELPER, f"building {what}", facts, site=site_id("building a layer"))
    if len(set(rows)) != 1:
        chosen = context.guard.share(f"{what}, options ({options})", what)
        listed = "; ".join(f"rank {r}: {c}" for r, c in enumerate(chosen))
        raise ValueError(
            f"building a layer: the backend or its options differ between ranks of the {context.guard.name} group "
            f"({listed}); every rank must build the same layers the same way"
        )
    backend.prepare(context, options)


def plan_for(backend: Backend, problem: AttentionProblem, context: Context | None = None) -> Plan:
    """``backend``'s plan for ``problem``, from the cache when the same facts were planned before."""
    cache = _PLANS if context is None else context.plans
    key = (backend.name, id(backend), problem.key)
    plan = cache.get(key)
    if plan is None:
        backend.check(problem)
        plan = backend.plan(problem)
        cache[key] = plan
        if len(cache) > _MAX_PLANS:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return plan


def _execute(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return plan(q, k, v)
    except RuntimeError as exc:
        raise _collective_error(exc, what, "forward") from exc


def _collective_error(exc: RuntimeError, what: str, phase: str) -> RuntimeError:
    """A failed transfer (a peer that never came, or left) as an error naming the call and the rule."""
    text = str(exc)
    lost = isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset", "connectFullMesh")
    )
    if not lost:
        return exc
    return CollectiveTimeout(
        f"the {phase} of {what} did not complete: a rank of the group did not join its collectives in time, or "
        f"left. Rule: {RULE}. ({type(exc).__name__}: {text[:200]})"
    )


def _traced_local(q, k, v, call: Call) -> torch.Tensor:
    """The local backend as one SDPA call, which torch.compile traces (same arithmetic, top-left causal)."""
    scale = default_scale(q.shape[-1]) if call.scale is None else call.scale
    if call.kv_len is not None:
        k, v = k[:, :, : call.kv_len], v[:, :, : call.kv_len]
    mask = None
    if call.causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=call.dropout, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


class _Guarded(torch.autograd.Function):
    """A plan's attention whose backward first meets the other ranks at the guard, then runs the plan's backward.

    The plan runs on detached views of q, k, v with grad enabled (its own graph);
    this function's backward checks that every rank is in the same backward
    (:mod:`mosaic.guard`), then backpropagates through that graph — so a rank
    that skipped this backward is caught at the guard, and a transfer that
    fails in the plan's backward raises an error naming the layer.
    """

    @staticmethod
    def forward(ctx, plan: Plan, guard: Guard | None, what: str, q, k, v):
        inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        with torch.enable_grad():
            out = _execute(plan, *inputs, what)
        ctx.inputs, ctx.out, ctx.guard, ctx.what = inputs, out, guard, what
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.guard is not None:  # None under checks="on_change"
            ctx.guard.agree(BACKWARD, ctx.what)
        inputs, out = ctx.inputs, ctx.out
        ctx.inputs = ctx.out = None  # the inner graph goes with this backward
        wanted = [t for t in inputs if t.requires_grad]
        try:
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        except RuntimeError as exc:
            raise _collective_error(exc, ctx.what, "backward") from exc
        return None, None, None, *(next(grads) if t.requires_grad else None for t in inputs)
