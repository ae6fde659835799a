"""``mosaic.attention``: attention on projected ``(batch, heads, seq_local, head_dim)`` tensors.

This is the whole call path; ``MultiAxisAttention`` is projections around it.

1. Facts (:func:`call_facts`). Each rank describes its call once: lengths
   along the sequence dim, batch, heads, dtype, ``kv_len``, ``causal``, layout,
   the backend and its options, and which declared sharded dim its lengths
   say it attends over (:mod:`mosaic.declarations`). A local check that fails
   becomes the same error on every rank (through the agreement below).
2. Plan. Plans are cached by those facts. When the declarations say every
   rank's lengths, a cached plan runs at once: the call is only logged, and
   the ranks compare the log at the end of the step (:mod:`mosaic.agreement`).
   Otherwise — the first call with these facts, or lengths the declarations do
   not say — the ranks agree on the facts in one host collective, every rank
   builds the same :class:`~mosaic.problem.AttentionProblem`, and the backend
   plans it.
3. Execute. The plan runs collectives and kernels. A collective that fails (a
   peer did not come) makes the ranks agree on what went wrong and raise it
   together, in the forward and the backward (:func:`mosaic.comm.serving`);
   the end of a backward pass that ran a sharded layer is an agreement.

With ``checks="every_call"`` every call and its backward agree first (debug).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from . import comm
from .agreement import BACKWARD, BUILD, CALL, FORWARD, PLAN, STEP, site_id
from .backend import Backend, Plan
from .context import Context, get_context, is_initialized
from .declarations import AMBIGUOUS
from .kernels import default_scale
from .layout import LAYOUTS, LayoutKind, SeqLayout, check_layout
from .options import Options
from .plans import build_plan
from .problem import DTYPES, AttentionProblem, check_kv_len, kv_len_int
from .registry import get_backend

__all__ = [
    "Call",
    "LayoutRule",
    "agreed_problem",
    "attend",
    "attention",
    "call_facts",
    "prepare_backend",
    "prepare_layer",
]

# The columns of a plan round's row, and what a disagreement in each means.
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
    "sharded=",
    "whether a backward runs",
)
_PER_RANK = 2  # query and key rows may differ between ranks
_DEVICES = ("cpu", "cuda")
_SHARDED = {None: 0, True: 1, False: 2}


@dataclass(frozen=True)
class Call:
    """What a caller asks of one attention call, besides the tensors (``kv_len`` already an int)."""

    backend: Backend
    options: Options
    kv_len: int | None = None
    causal: bool = False
    layout: str = "contiguous"
    scale: float | None = None
    dropout: float = 0.0
    batch_shape: tuple[int, ...] = ()
    what: str = "mosaic.attention"
    sharded: bool | None = None  # None: from the declarations; True: the caller says the dim is sharded

    @cached_property
    def site(self) -> int:
        return site_id(self.what)


_CALL_FIELDS = tuple(f.name for f in fields(Call))


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
    sharded: bool | None = None,
    context: Context | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` along dim 2, sharded over the sp group by ``backend``.

    Args:
        q: ``(batch, heads, q_rows, head_dim)``: this rank's query rows (with a distributed
            backend, its shard of the sequence; any lengths, zero included).
        k: ``(batch, kv_heads, k_rows, head_dim)``, ``heads % kv_heads == 0`` (GQA/MQA):
            keys from the same rows as the queries (self-attention), another sequence
            sharded the same way (cross-attention), or, with ``backend="local"``, keys every
            rank holds whole (inducing points, a replicated cache).
        v: values, shaped like ``k``.
        backend: a name from ``mosaic.available_backends()``, ``"auto"``, or a Backend.
        options: the backend's options (``mosaic.get_backend(name).Options`` lists them).
        kv_len: only keys at global positions ``< kv_len`` are attended (TabPFN's training
            rows); ints, numpy integers and 0-d integer tensors.
        causal: query ``i`` attends to keys ``j <= i`` (global positions).
        layout: how the sequence is spread over the ranks (``"contiguous"``, ``"zigzag"``).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        dropout: attention dropout probability (``local`` only).
        sharded: ``None`` (default): a distributed backend needs keys whose lengths are a dim
            declared sharded (``ctx.shard``, ``ctx.sharded_dim``), queries either sharded alike
            or whole on every rank; ``local`` refuses keys that are this rank's part of one.
            ``True``: the caller says the keys are sharded over the sp group (a K/V cache of the
            rows each rank holds); ``False``: the dim is whole on every rank.
        context: the :class:`~mosaic.Context` (default: the one ``mosaic.init`` made).
        name: how errors name this call (default ``"mosaic.attention(backend=...)"``).

    Returns:
        ``(batch, heads, q_rows, head_dim)`` in q's dtype; differentiable in q, k and v.
    """
    chosen = backend if isinstance(backend, Backend) else get_backend(backend)
    check_layout(layout)
    what = name or f"mosaic.attention(backend={chosen.name!r})"
    call = Call(chosen, chosen.parse_options(options), None, bool(causal), layout, scale, float(dropout),
                (q.shape[0],), what, sharded)  # fmt: skip
    try:
        call = _with_kv_len(call, kv_len)
    except TypeError as exc:  # a kv_len of the wrong type on one rank: every rank must hear of it
        return attend(None, None, None, call, context, error=exc)
    if not chosen.capabilities.distributed and sharded is None and getattr(k, "_mosaic_sharded", False):
        error = ValueError(
            f"{what}: k and v are this rank's rows of a dim sharded over the sp group (from MultiAxisAttention."
            "project on a sharded tensor), but backend='local' attends only to the keys it is given: use a "
            "distributed backend ('allgather', 'ring', 'auto', ...), or sharded=False if they are whole"
        )
        return attend(None, None, None, call, context, error=error)
    if not chosen.capabilities.distributed and sharded and _sp_size(context) > 1:
        # The same on every rank (no exchange needed): the call says its keys are a part of each rank's.
        raise ValueError(
            f"{what}: sharded=True says the keys are this rank's part of a dim sharded over the sp group, but "
            "backend='local' attends only to the keys it is given: use a distributed backend ('allgather', "
            "'ring', 'auto', ...)"
        )
    return attend(q, k, v, call, context)


def _sp_size(context: Context | None) -> int:
    if context is not None:
        return context.sp_size
    return get_context().sp_size if is_initialized() else 1


def _with_kv_len(call: Call, kv_len: Any) -> Call:
    from dataclasses import replace

    return replace(call, kv_len=kv_len_int(kv_len))


@dataclass
class LayoutRule:
    """How the ranks' layouts along the attention dim are known: from the declarations, or from the agreed rows.

    The default rule is the 1-D one of :mod:`mosaic.declarations`; a module with layouts of its own
    (``MultiAxisAttention2D``'s grid) passes ``agreed`` (layouts from every rank's row, its own
    ``facts`` included) and, when its layouts can be derived without an exchange, ``known``.
    """

    facts: Sequence[int] = ()
    agreed: Callable[[list[tuple[int, ...]]], tuple[SeqLayout, SeqLayout]] | None = None
    known: tuple[SeqLayout, SeqLayout] | None = None
    key: tuple = field(default=())


def call_facts(q: torch.Tensor, k: torch.Tensor, call: Call, backward: bool) -> list[int]:
    """The integers that describe this rank's call (the columns of :data:`_FACTS`); checks its shapes."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, length, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % max(k.shape[1], 1):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: batch and head dim must match, "
                         "and the query heads must be a multiple of the kv heads")  # fmt: skip
    scale = default_scale(d) if call.scale is None else call.scale
    return [
        length, k.shape[2], b, h, k.shape[1], d, -1 if call.kv_len is None else call.kv_len, int(call.causal),
        DTYPES.index(q.dtype) if q.dtype in DTYPES else -1,
        _DEVICES.index(q.device.type) if q.device.type in _DEVICES else len(_DEVICES),
        LAYOUTS.index(call.layout) if call.layout in LAYOUTS else len(LAYOUTS), _bits(scale), _bits(call.dropout),
        site_id(call.backend.name), call.backend.agreement_digest(call.options), site_id(repr(call.batch_shape)),
        _SHARDED[call.sharded], int(backward),
    ]  # fmt: skip


def _bits(x: float) -> int:
    """The bits of a float64, as an int64 (floats travel in agreement rows exactly)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def attend(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    call: Call,
    context: Context | None = None,
    *,
    error: BaseException | None = None,
    rule: LayoutRule | None = None,
) -> torch.Tensor:
    """:func:`attention` for callers that check or describe more (modules).

    Args:
        error: the caller's own input check failed on this rank (q, k, v are then
            ``None``); with a distributed backend every rank raises it.
        rule: layouts beyond the 1-D declarations (:class:`LayoutRule`).
    """
    if not call.backend.capabilities.distributed:
        if error is not None:
            raise error
        if torch.compiler.is_compiling() and call.backend.name == "local":
            if getattr(call.options, "kernel", None) is None:
                return _traced_local(q, k, v, call)
            return _planned_local(q, k, v, call)  # a named kernel runs as it is: one graph break
        return build_plan(call.backend, _local_problem(q, k, call))(q, k, v)
    ctx = context or get_context()
    if torch.compiler.is_compiling() and error is None and rule is None and ctx.checks != "every_call":
        # The call travels as its fields: dynamo passes constants and objects made before the trace.
        index = _traced_entry(ctx, *(getattr(call, name) for name in _CALL_FIELDS), _stand_in(q), _stand_in(k),
                              _backward(q, k, v))  # fmt: skip
        if index >= 0:
            return ctx.calls.traced[index].plan(q, k, v)
    return _distributed(q, k, v, call, ctx, error, rule)


def _stand_in(x: torch.Tensor) -> tuple:
    """What planning reads of a tensor (shape, dtype, device), as constants a trace can pass on."""
    return tuple(x.shape), x.dtype, x.device


@torch._dynamo.assume_constant_result
def _traced_entry(ctx: Context, *args: Any) -> int:
    """Where the plan of a call being traced by torch.compile is (``ctx.calls.traced``), made (and agreed)
    while tracing: the graph runs it.

    Every rank traces the same graph at the same time, so a plan-cache miss agrees then, as it would
    eagerly; the plan's collectives are traced into the graph, and dynamo's guards hold every later run
    of the graph to the traced facts (shapes, dtypes, module attributes), so a run agrees nothing.
    -1 when the call's layouts need agreeing on every call (lengths no declaration implies) or its plan is
    not :attr:`~mosaic.backend.Plan.traceable`: the call then runs eagerly, one graph break; also
    when the agreement raised (on every rank).
    """
    *values, q, k, backward = args
    call = Call(*values)
    q, k = (torch.empty(1, dtype=dtype, device=device).expand(shape) for shape, dtype, device in (q, k))
    try:
        try:
            facts = call_facts(q, k, call, backward)
            rule = _declared_rule(ctx, call, q.shape[2], k.shape[2])
        except (TypeError, ValueError) as exc:  # every rank must hear of it, as eagerly
            ctx.agreement.round(PLAN, call.what, error=exc, site=call.site)
            raise AssertionError("unreachable: the round raises") from exc
        key = (call.site, call.backend.name, id(call.backend), tuple(facts), tuple(rule.facts), rule.key)
        entry = ctx.calls.get(key)
        if entry is None:
            entry = _agree_and_plan(q, k, call, ctx, facts, rule, backward, False)
            if entry.fast:
                ctx.calls.put(key, entry)
    except Exception:
        # Raised on every rank (agreed): the call runs eagerly, where the ranks agree again and raise it
        # themselves (raised here, the compiler would wrap it in its own error; under ``fullgraph=True``
        # the compiler refuses the eager call, on every rank alike).
        return -1
    return ctx.calls.pin(entry) if entry.fast and entry.plan.traceable else -1


@torch.compiler.disable
def _planned_local(q, k, v, call: Call) -> torch.Tensor:
    return build_plan(call.backend, _local_problem(q, k, call))(q, k, v)


def _local_problem(q: torch.Tensor, k: torch.Tensor, call: Call) -> AttentionProblem:
    q_layout, kv_layout = SeqLayout((q.shape[2],)), SeqLayout((k.shape[2],))
    return _problem(q, k, call, q_layout, kv_layout, 0, None, _backward(q, k))


def _backward(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class _Entry:
    problem: AttentionProblem
    plan: Plan
    digest: int
    fast: bool  # every rank's facts imply every rank's layout: later calls with these facts need no agreement


@torch.compiler.disable
def _distributed(q, k, v, call: Call, ctx: Context, error, rule: LayoutRule | None) -> torch.Tensor:
    # The agreement, the plan and the collectives run eagerly, in the same order on every rank:
    # under torch.compile a sharded call is one graph break.
    every_call = ctx.checks == "every_call"
    if error is not None:
        ctx.agreement.round(CALL if every_call else PLAN, call.what, error=error, site=call.site)
    try:
        backward = _backward(q, k, v)
        facts = call_facts(q, k, call, backward)
        rule = rule or _declared_rule(ctx, call, q.shape[2], k.shape[2])
    except (TypeError, ValueError) as exc:
        ctx.agreement.round(CALL if every_call else PLAN, call.what, error=exc, site=call.site)
        raise AssertionError("unreachable: the round raises") from exc
    key = (call.site, call.backend.name, id(call.backend), tuple(facts), tuple(rule.facts), rule.key)
    entry = None if every_call else ctx.calls.get(key)
    if entry is None:
        entry = _agree_and_plan(q, k, call, ctx, facts, rule, backward, every_call)
        # Cached only when every rank's facts imply every rank's layout (agreed: each rank says so in its
        # row), so that the ranks hit and miss together; otherwise every call agrees.
        if entry.fast and not every_call:
            ctx.calls.put(key, entry)
    else:
        ctx.agreement.record(FORWARD, call.what, entry.digest)
    return _execute(entry.plan, q, k, v, call, ctx, backward)


def _declared_rule(ctx: Context, call: Call, q_len: int, k_len: int) -> LayoutRule:
    """The 1-D rule: the declared dims this rank's lengths are part of say every rank's layout.

    Its facts — the declared totals of the query and key dims (-1: none, -2: several fit) and a digest
    of every declaration — are agreed with the call's, so every rank decides the checks alike.
    """
    if ctx.sp_size == 1:  # one rank holds every position: nothing to declare or derive
        one = (SeqLayout((q_len,), call.layout), SeqLayout((k_len,), call.layout))
        return LayoutRule(facts=(-1, -1, 0), known=one, agreed=lambda rows: one)
    if call.sharded is not None:
        return LayoutRule(facts=(-1, -1, 0))
    q_dim, k_dim = (ctx.declarations.of_length(n) for n in (q_len, k_len))
    totals = tuple(-1 if d is None else d.total for d in (q_dim, k_dim))
    known = None
    if all(d is not None and d is not AMBIGUOUS and d.kind == call.layout for d in (q_dim, k_dim)):
        known = (q_dim.layout, k_dim.layout)
    return LayoutRule(facts=(*totals, ctx.declarations.digest()), known=known, key=totals)


def _agree_and_plan(q, k, call: Call, ctx: Context, facts, rule: LayoutRule, backward, every_call) -> _Entry:
    problem, fast, digest = _agreed(q, k, call, ctx, facts, rule, backward, CALL if every_call else PLAN)
    return _Entry(problem, build_plan(call.backend, problem, ctx.plans), digest, fast)


def _agreed(
    q, k, call: Call, ctx: Context, facts, rule: LayoutRule, backward: bool, kind: int
) -> tuple[AttentionProblem, bool, int]:
    """The agreed problem; whether every rank's facts imply the layouts (``rule.known`` on every rank); and a
    digest of every rank's facts, the same on every rank (what a cached call logs)."""
    rows = ctx.agreement.round(kind, call.what, [*facts, *rule.facts, int(rule.known is not None)], site=call.site)
    fast = all(r[-1] for r in rows)
    rows = [r[:-1] for r in rows]
    digest = site_id(repr(rows))
    for column in range(_PER_RANK, len(_FACTS)):
        values = [r[column] for r in rows]
        if len(set(values)) != 1:
            raise ValueError(f"{call.what}: {_disagreement(column, values, ctx.agreement.name, call)}")
    if rule.agreed is not None:
        q_layout, kv_layout = rule.agreed(rows)
    else:
        q_layout, kv_layout = _agreed_layouts(rows, call, ctx)
    return _problem(q, k, call, q_layout, kv_layout, ctx.sp_rank, ctx, backward), fast, digest


def agreed_problem(
    q: torch.Tensor | None, k: torch.Tensor | None, call: Call, error: BaseException | None = None
) -> AttentionProblem:
    """The problem a call would pose, as every rank of the sp group sees it (collective, like the call).

    For ``mosaic.explain`` and benchmarks: a local failure (``error``, or shapes that do not fit) or a
    disagreement raises the same error on every rank; nothing is planned.
    """
    if not is_initialized():
        if error is not None:
            raise error
        q_layout, kv_layout = SeqLayout((q.shape[2],), call.layout), SeqLayout((k.shape[2],), call.layout)
        return _problem(q, k, call, q_layout, kv_layout, 0, None, _backward(q, k))
    ctx = get_context()
    if error is None:
        try:
            backward = _backward(q, k)
            facts = call_facts(q, k, call, backward)
            rule = _declared_rule(ctx, call, q.shape[2], k.shape[2])
        except (TypeError, ValueError) as exc:
            error = exc
    if error is not None:
        ctx.agreement.round(PLAN, call.what, error=error, site=call.site)
    return _agreed(q, k, call, ctx, facts, rule, backward, PLAN)[0]


def _agreed_layouts(rows: list[tuple[int, ...]], call: Call, ctx: Context) -> tuple[SeqLayout, SeqLayout]:
    """Every rank's layouts from the agreed rows; the declaration checks, decided alike on every rank.

    The rows carry each rank's lengths and a digest of its declarations; with the same declarations on every
    rank (checked here), whether the lengths are a declared layout is the same question everywhere.
    """
    q_lens, k_lens = tuple(r[0] for r in rows), tuple(r[1] for r in rows)
    digests = [r[len(_FACTS) + 2] for r in rows]
    if len(set(digests)) != 1:
        raise ValueError(
            f"{call.what}: the ranks declare their sharded dims differently (ctx.shard / ctx.sharded_dim with "
            f"other totals or layouts; digests {digests}); declare them the same way on every rank"
        )
    kind = call.layout
    if call.sharded is False:
        raise ValueError(f"{call.what}: sharded=False, but backend {call.backend.name!r} shards the attention dim")
    if call.sharded is None:
        _check_declared("keys", k_lens, kind, call, ctx)
        if not ctx.declarations.matches(q_lens, kind) and (len(set(q_lens)) != 1 or call.causal):
            _check_declared("queries", q_lens, kind, call, ctx)
    return SeqLayout(q_lens, kind), SeqLayout(k_lens, kind)


def _check_declared(what: str, lengths: tuple[int, ...], kind: str, call: Call, ctx: Context) -> None:
    """Raise unless ``lengths`` are the layout of a declared dim sharded with ``kind``, saying what to do."""
    layouts = {d.kind: d.layout.lengths for d in ctx.declarations.all() if d.layout and d.layout.lengths == lengths}
    if kind in layouts or kind in ctx.declarations.open_kinds():
        return
    if not layouts and ctx.declarations.open_kinds():
        other = next(iter(ctx.declarations.open_kinds()))
        layouts = {other: lengths}
    if layouts:
        other = next(iter(layouts))
        raise ValueError(
            f"{call.what} expects layout={kind!r}, but its attention dim was sharded with layout={other!r} "
            f"(ctx.shard(x, dim, {other!r})); build the layer with layout={other!r} or shard with layout={kind!r}"
        )
    raise ValueError(
        f"{call.what} shards its attention dim with backend {call.backend.name!r}, but its {what} (lengths "
        f"{list(lengths)} on the ranks of the sp group) are not a dim declared sharded: shard the input with "
        "ctx.shard(x, dim) (or declare rows each rank made itself with ctx.sharded_dim(total, dim)); if the dim is "
        "whole on every rank, use backend='local'; for keys sharded otherwise (a K/V cache of the rows each rank "
        "holds), say sharded=True"
    )


def _problem(q, k, call: Call, q_layout: SeqLayout, kv_layout: SeqLayout, rank: int, ctx, backward: bool):
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
        backward=backward,
        context=ctx,
        group=None if ctx is None else ctx.sp_group,
    )


def _disagreement(column: int, values: list[int], group: str, call: Call) -> str:
    name = _FACTS[column]
    if name == "dtype":
        values = [str(DTYPES[v]) if v >= 0 else "other" for v in values]  # type: ignore[misc]
    elif name == "layout":
        values = [LAYOUTS[v] if v < len(LAYOUTS) else "other" for v in values]  # type: ignore[misc]
    elif name == "kv_len":
        values = [None if v == -1 else v for v in values]  # type: ignore[misc]
    elif name == "sharded=":
        values = [{0: None, 1: True, 2: False}[v] for v in values]  # type: ignore[misc]
    elif name == "backend options" and call.backend.name == "auto":
        return call.backend.digest_differs(group)
    elif name in ("backend", "backend options", "softmax scale", "dropout", "batch shape (the folded dims)"):
        return (
            f"attention calls disagree across the {group} group: the {name} differ between ranks "
            f"(digests {values}); every rank must build the layer the same way (same backend, options, "
            "scale, dropout) and pass the same shapes except along the attention dim"
        )
    return (
        f"attention inputs disagree across the {group} group: {name} is {values} on {group} ranks "
        f"0..{len(values) - 1}; every rank must pass the same shapes except along the attention dim"
    )


def prepare_backend(backend: Backend, options: Options, context: Context, what: str) -> None:
    """Check that every rank of the sp group chose this backend and options, then let it create its groups.

    Group creation is collective: ranks with different options would create different groups and hang
    there, so they compare first and all raise. Local layers compare too (a rank that switched one layer to
    ``local`` alone would run no collective where the others wait).
    """
    facts = [site_id(backend.name), backend.agreement_digest(options)]
    # One site for every build, so that ranks building different layers compare their facts.
    rows = context.agreement.round(BUILD, f"building {what}", facts, site=site_id("building a layer"))
    if len(set(rows)) != 1:
        chosen = context.agreement.share(f"{what}, options ({options})", what)
        if len(set(chosen)) == 1:  # the same layer and options: what differs is each rank's own environment
            raise ValueError(f"building {what}: {backend.digest_differs(context.agreement.name)}")
        listed = "; ".join(f"rank {r}: {c}" for r, c in enumerate(chosen))
        raise ValueError(
            f"building a layer: the backend or its options differ between ranks of the {context.agreement.name} "
            f"group ({listed}); every rank must build the same layers the same way"
        )
    if backend.capabilities.distributed:
        backend.prepare(context, options)


def prepare_layer(backend: Backend, options: Options, what: str) -> None:
    """:func:`prepare_backend` when Mosaic is initialised with several sp ranks (a layer being built)."""
    if is_initialized() and get_context().sp_size > 1:
        prepare_backend(backend, options, get_context(), what)


def _execute(plan: Plan, q, k, v, call: Call, ctx: Context, backward: bool) -> torch.Tensor:
    marks = backward and not ctx.agreement.alone and not torch.compiler.is_compiling()
    if marks:
        q, k, v = _Enter.apply(q, k, v)
    backward_before = comm.set_backward(False)
    with comm.serving(lambda exc: ctx.fail(exc, call.what, "forward")):
        try:
            out = plan(q, k, v)
        except Exception as exc:
            if getattr(exc, "mosaic_agreed", False):
                raise
            raise ctx.fail(exc, call.what, "forward") from exc
        finally:
            comm.set_backward(backward_before)  # a forward recomputed in a backward (checkpointing)
    if marks:
        out = _Exit.apply(out, _Backward(call.what, ctx))
    return out


@dataclass(frozen=True)
class _Backward:
    """What the backward of one sharded call needs to log itself and to fail with the others."""

    what: str
    ctx: Context

    def begin(self) -> None:
        ctx = self.ctx
        if ctx.checks == "every_call":
            ctx.agreement.round(BACKWARD, self.what, site=site_id(self.what))
        else:
            ctx.agreement.record(BACKWARD, self.what)
            _agree_at_the_end_of_this_backward(ctx)
        comm.set_serving(lambda exc: ctx.fail(exc, self.what, "backward"))
        comm.set_backward(True)


def _agree_at_the_end_of_this_backward(ctx: Context) -> None:
    """Queue one step agreement for the end of the running backward pass (once per pass)."""
    task = torch._C._current_graph_task_id()
    if getattr(ctx, "_agreeing_task", None) == task:
        return
    ctx._agreeing_task = task  # type: ignore[attr-defined]

    def at_the_end() -> None:
        ctx._agreeing_task = None  # type: ignore[attr-defined]
        comm.set_serving(None)
        comm.set_backward(False)
        ctx.agreement.round(STEP, "the end of a backward pass", site=site_id("step"))

    torch.autograd.Variable._execution_engine.queue_callback(at_the_end)


class _Enter(torch.autograd.Function):
    """Identity on q, k, v; its backward runs after the plan's: the call's collectives are done."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        comm.set_serving(None)
        comm.set_backward(False)
        return dq, dk, dv


class _Exit(torch.autograd.Function):
    """Identity on the output; its backward runs before the plan's: it logs the call's backward (or agrees on it
    with ``checks="every_call"``) and names the call its collectives fail for."""

    @staticmethod
    def forward(ctx, out, info: _Backward):
        ctx.info = info
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        ctx.info.begin()
        return dout, None


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
