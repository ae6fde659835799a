"""``composed``: head parallelism over one mesh axis x a sequence strategy over the other.

The sp group of ``P = h * s`` ranks is a grid ``(s, h)``: sp rank
``seq * h + head``, so the ``h`` ranks of one head group are contiguous
(one node, when ``h`` fits in one, as with torchrun's rank order) and the
slower links carry only the sequence strategy. The steps (USP/LoongTrain
2-D attention):

1. all-to-all over the head group: each rank keeps ``H / h`` heads for the
   rows of its whole head group (keys only below ``kv_len``);
2. the sequence strategy (``ring``, ``allgather``, ``mesh2d``, ``local`` when
   ``s = 1``, ...) over the seq group, the ``s`` ranks with the same head
   coordinate, on those heads;
3. the inverse all-to-all. Heads are independent, so the result is exact.

Head groups are adjacent ranks, so a seq rank holds the union of their
positions: one contiguous run for a contiguous layout, and for
``layout="zigzag"`` over the sp group the zigzag layout over the seq group
(chunks ``c`` and ``2s - 1 - c``), so a causal ring stays balanced.

Per rank (``n = N / P`` rows held, ``n'`` keys below ``kv_len``): the
all-to-alls receive ``(h-1)/h * (2 * n * H + 2 * n' * Hkv) * d`` elements in the
forward and as much in the backward; the sequence strategy then moves
``H / h`` heads of ``h * n`` rows over ``s`` ranks (a ring: ``(s-1)/s * N' *
2 * Hkv / h * d`` in the forward).

Options (:class:`ComposedOptions`, checked when the module is built):
``mesh_shape`` ``(h, s)``, ``head_parallel`` (default ``True``; ``False``
runs the sequence strategy on the whole sp group), ``seq_parallel`` (a
backend name, default ``"ring"``), ``seq_mesh_shape`` (the inner strategy's
``mesh_shape``, e.g. ``(R, C)`` for ``mesh2d``) and ``seq_options`` (the
inner strategy's other options). The plan composes the inner strategy's
plan, made once per problem and cached with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    BackendNotSupported,
    BackendUnavailable,
    Capabilities,
    Context,
    Cost,
    MultiAxisAttention,
    Options,
    Plan,
    SeqLayout,
    check_shape,
    get_backend,
    plan_inner,
)

from .exchange import HeadExchange, merge_spans
from .ulysses import exchange_cost, head_exchanges, head_split_reasons, to_heads

__all__ = ["ComposedAttention", "ComposedBackend", "ComposedOptions", "ComposedPlan"]


@dataclass(frozen=True)
class ComposedOptions(Options):
    """Options of ``composed``: the mesh, and the sequence strategy with its own options."""

    mesh_shape: tuple[int, int]
    head_parallel: bool = True
    seq_parallel: str = "ring"
    seq_mesh_shape: tuple[int, ...] | None = None
    seq_options: Any = ()
    inner: Options = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mesh_shape", check_shape("mesh_shape", self.mesh_shape, 2))
        if not isinstance(self.head_parallel, bool):
            raise ValueError(f"option head_parallel must be a bool, got {self.head_parallel!r}")
        if not isinstance(self.seq_parallel, str):
            raise ValueError(f"option seq_parallel must be a backend name, got {self.seq_parallel!r}")
        if self.seq_parallel == "composed":
            raise ValueError("seq_parallel='composed' would nest the composition in itself; choose e.g. 'ring'")
        inner = dict(self.seq_options.items() if isinstance(self.seq_options, Mapping) else self.seq_options)
        object.__setattr__(self, "seq_options", tuple(sorted(inner.items())))
        if self.seq_mesh_shape is not None:
            shape = check_shape("seq_mesh_shape", self.seq_mesh_shape)
            object.__setattr__(self, "seq_mesh_shape", shape)
            inner["mesh_shape"] = shape
        try:
            backend = get_backend(self.seq_parallel)
        except BackendUnavailable as exc:
            raise ValueError(f"seq_parallel={self.seq_parallel!r}: {exc}") from None
        object.__setattr__(self, "inner", backend.parse_options(inner))


def _inner_problem(p: AttentionProblem, o: ComposedOptions, seq_group=None) -> AttentionProblem:
    """What the sequence strategy runs; ``seq_group`` is left out while checking."""
    if not o.head_parallel:
        return dataclasses.replace(p, options=o.inner)
    h, s = o.mesh_shape
    groups = [range(c * h, (c + 1) * h) for c in range(s)]
    q_spans = [merge_spans([span for r in g for span in p.q_layout.spans(r)]) for g in groups]
    kv_spans = [merge_spans([span for r in g for span in p.kv_block(r).spans]) for g in groups]
    return dataclasses.replace(
        p,
        heads=p.heads // h,
        kv_heads=p.kv_heads // h,
        q_layout=SeqLayout.from_spans(q_spans, p.q_layout.kind),
        kv_layout=SeqLayout.from_spans(kv_spans, p.kv_layout.kind),
        rank=p.rank // h,
        group=seq_group,
        options=o.inner,
    )


class ComposedBackend(Backend):
    """Ulysses over the ``h`` mesh axis, a sequence strategy over the ``s`` axis."""

    name = "composed"
    capabilities = Capabilities()
    Options = ComposedOptions

    def candidate_options(self, problem: AttentionProblem) -> list[Options]:
        """Every ``(h, s)`` with ``1 < h < P`` dividing both head counts, over a ring or an all-gather."""
        p = problem.size
        return [
            ComposedOptions((h, p // h), seq_parallel=inner)
            for h in range(2, p)
            if p % h == 0 and problem.heads % h == 0 and problem.kv_heads % h == 0
            for inner in ("ring", "allgather")
        ]

    def prepare(self, context: Context, options: Options) -> None:
        h, s = options.mesh_shape
        if h * s != context.sp_size:
            raise BackendNotSupported(
                f"backend 'composed': mesh_shape {(h, s)} has {h * s} ranks but the sp group has {context.sp_size}; "
                f"use (h, {context.sp_size} // h)"
            )
        if options.head_parallel and context.sp_size > 1:
            context.grid((s, h), ("seq", "head"))

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        p, o = problem, problem.options
        h, s = o.mesh_shape
        if h * s != p.size:
            return [
                f"mesh_shape {o.mesh_shape} has {h * s} ranks but the sp group has {p.size}; use (h, {p.size} // h)"
            ]
        if o.head_parallel:
            where = f"the head axis (h = {h} of mesh_shape {o.mesh_shape})"
            hint = "choose an h that divides both head counts, or head_parallel=False"
            reasons = head_split_reasons(p.heads, p.kv_heads, h, where, hint)
            if reasons:
                return reasons
        inner_backend = get_backend(o.seq_parallel)
        inner = _inner_problem(p, o)
        if not inner_backend.capabilities.distributed and inner.size > 1:
            return [
                f"seq_parallel={o.seq_parallel!r} attends within one rank, so it needs s = 1 "
                f"(mesh_shape ({p.size}, 1) with head_parallel=True); the sequence axis has {inner.size} ranks"
            ]
        return [f"seq_parallel={o.seq_parallel!r}: {r}" for r in inner_backend.not_supported_reasons(inner)]

    def estimate(self, problem: AttentionProblem) -> Cost:
        p, o = problem, problem.options
        inner = get_backend(o.seq_parallel).estimate(_inner_problem(p, o))
        if not o.head_parallel:
            return inner
        h, s = o.mesh_shape
        return exchange_cost(p, [range(c * h, (c + 1) * h) for c in range(s)]) + inner

    def plan(self, problem: AttentionProblem) -> Plan:
        p, o = problem, problem.options
        inner_backend = get_backend(o.seq_parallel)
        if not o.head_parallel:
            inner = plan_inner(inner_backend, _inner_problem(p, o))
            return ComposedPlan(p, inner.cost, None, None, inner)
        h, s = o.mesh_shape
        grid = p.context.grid((s, h), ("seq", "head"), p.group)
        seq, head = grid.coords
        inner = plan_inner(inner_backend, _inner_problem(p, o, grid.group("seq")))
        q_exchange, kv_exchange = head_exchanges(p, range(seq * h, (seq + 1) * h), grid.group("head"), head)
        exchange = exchange_cost(p, [range(c * h, (c + 1) * h) for c in range(s)])
        return ComposedPlan(p, exchange + inner.cost, q_exchange, kv_exchange, inner)


@dataclass(frozen=True)
class ComposedPlan(Plan):
    """The head exchanges of this rank's head group (none without head parallelism) and the inner plan."""

    q_exchange: HeadExchange | None
    kv_exchange: HeadExchange | None
    inner: Plan

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.q_exchange is None:
            return self.inner(q, k, v)
        q, k, v = to_heads(q, k, v, self.problem, self.q_exchange, self.kv_exchange)
        return self.q_exchange.to_seq(self.inner(q, k, v))


class ComposedAttention(MultiAxisAttention):
    """``MultiAxisAttention`` with ``backend="composed"``: head parallel x sequence parallel.

    Args:
        mesh_shape: ``(h, s)``, ``h * s`` = the sp group size. The ``h`` ranks of a head
            group are contiguous sp ranks (intra-node under torchrun's rank order);
            ``s`` ranks with the same head coordinate run the sequence strategy.
        head_parallel: ``False`` runs ``seq_parallel`` on the whole sp group.
        seq_parallel: the sequence strategy's backend name (``"ring"``, ``"allgather"``,
            ``"mesh2d"``, ``"local"`` when ``s = 1``).
        embed_dim: as for ``MultiAxisAttention``.
        num_heads: as for ``MultiAxisAttention``; it (and ``num_kv_heads``) must be divisible by ``h``.
        attention_axis: as for ``MultiAxisAttention``.
        seq_mesh_shape: the sequence strategy's own ``mesh_shape`` (``mesh2d``: ``(R, C)``,
            ``R * C = s``, or the sp group size when ``head_parallel=False``).
        **kwargs: the other keyword arguments of ``MultiAxisAttention`` (``num_kv_heads``,
            ``bias``, ``dropout``, ``layout``, ``device``, ``dtype``). Use
            ``layout="zigzag"`` for a balanced causal ring.
    """

    def __init__(
        self,
        mesh_shape: tuple[int, int],
        head_parallel: bool = True,
        seq_parallel: str = "ring",
        *,
        embed_dim: int,
        num_heads: int,
        attention_axis: int,
        seq_mesh_shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ):
        options: dict[str, Any] = {"head_parallel": head_parallel, "seq_parallel": seq_parallel}
        if seq_mesh_shape is not None:
            options["seq_mesh_shape"] = tuple(seq_mesh_shape)
        super().__init__(
            embed_dim,
            num_heads,
            attention_axis,
            backend="composed",
            mesh_shape=mesh_shape,
            backend_options=options,
            **kwargs,
        )
