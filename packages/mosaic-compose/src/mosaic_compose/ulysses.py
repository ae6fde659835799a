"""``ulysses``: head parallelism (DeepSpeed-Ulysses) over the sp group.

One all-to-all turns sequence sharding into head sharding: each of the ``P``
ranks then holds ``H / P`` query heads (and ``Hkv / P`` kv heads) for every
position, attends over the whole dim with the fused kernels, and a second
all-to-all sends the output rows back to their owners. The backward runs the
inverse all-to-alls (see :mod:`mosaic_compose.exchange`). Heads are
independent, so the result is exact.

Only key rows below ``kv_len`` are sent. In self-attention with no key cut
and no grouped kv heads, q, k and v travel in one all-to-all. Any layout
works: the gathered rows are put in position order, so causal attention is
one diagonal block.

Per rank, ``n = N / P`` rows held, ``n'`` of them keys below ``kv_len``:
forward ``(P-1)/P * (2 * n * H + 2 * n' * Hkv) * d`` elements received
(q, k, v in, the output back), the backward the same again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    Capabilities,
    Cost,
    Pass,
    Piece,
    Plan,
    SpanAttention,
    attention_passes,
    blocks,
)

from .exchange import HeadExchange

__all__ = ["UlyssesBackend", "UlyssesPlan", "exchange_cost", "head_exchanges", "head_split_reasons", "to_heads"]


def head_split_reasons(heads: int, kv_heads: int, parts: int, where: str, hint: str) -> list[str]:
    """Why ``heads``/``kv_heads`` can't be split over ``parts`` ranks (empty when they can)."""
    bad = [f"{name} {n}" for name, n in (("heads", heads), ("kv heads", kv_heads)) if n % parts]
    if not bad:
        return []
    return [f"{' and '.join(bad)} not divisible by the {parts} ranks of {where}; {hint}"]


def head_exchanges(
    problem: AttentionProblem, members: Sequence[int], group: dist.ProcessGroup | None, rank: int
) -> tuple[HeadExchange, HeadExchange]:
    """The query and key exchanges over ``group``, whose ranks are the problem's ranks ``members``.

    Keys are the rows below ``kv_len`` only (:meth:`AttentionProblem.kv_block`).
    """
    q = HeadExchange(group, rank, [problem.q_layout.spans(r) for r in members])
    kv = HeadExchange(group, rank, [problem.kv_block(r).spans for r in members])
    return q, kv


def exchange_cost(problem: AttentionProblem, members: Sequence[Sequence[int]]) -> Cost:
    """The all-to-alls of a head exchange over groups ``members``, forward and backward, for the busiest rank.

    A rank of ``h`` ranks receives ``(h-1)/h`` of its group's rows for its heads and
    sends as much back: q and the output (``H`` heads), k and v (``Hkv``).
    """
    p = problem
    e = torch.empty((), dtype=p.dtype).element_size()
    worst = 0.0
    for group in members:
        h = len(group)
        if h == 1:
            continue
        rows = sum(p.q_layout.lengths[r] for r in group)
        keys = sum(p.kv_block(r).size for r in group)
        worst = max(worst, (h - 1) / h * (2 * rows * p.heads + 2 * keys * p.kv_heads) / h)
    # Forward: q, k, v in and the output back; the backward moves the same again.
    moved = p.batch * p.head_dim * e * worst
    return Cost(Pass(bytes=moved, collectives=2), Pass(bytes=moved, collectives=2))


def to_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    problem: AttentionProblem,
    q_exchange: HeadExchange,
    kv_exchange: HeadExchange,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (this rank's rows, all heads) -> head-sharded, keys cut to ``kv_len``; differentiable."""
    block = problem.kv_block()
    k, v = block.take(k), block.take(v)
    if q_exchange.size == 1:
        return q, k, v
    # Decided on facts every rank shares, so all ranks take the same branch (and collectives).
    if q_exchange.spans == kv_exchange.spans and problem.heads == problem.kv_heads:
        q, k, v = q_exchange.to_heads(torch.stack([q, k, v])).unbind(0)
        return q, k, v
    kv = kv_exchange.to_heads(torch.stack([k, v]))
    return q_exchange.to_heads(q), kv[0], kv[1]


class UlyssesBackend(Backend):
    """Head parallelism: all-to-all to head sharding, whole-dim attention, all-to-all back."""

    name = "ulysses"
    capabilities = Capabilities()

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        hint = (
            "use backend='composed' with mesh_shape=(h, s) where h divides both head counts and h * s is the "
            "group size, or a sequence strategy ('ring', 'allgather', 'switch')"
        )
        return head_split_reasons(problem.heads, problem.kv_heads, problem.size, "the sp group", hint)

    def plan(self, problem: AttentionProblem) -> Plan:
        p = problem
        q_exchange, kv_exchange = head_exchanges(p, range(p.size), p.group, p.rank)
        pieces = blocks(q_exchange.positions, kv_exchange.positions, causal=p.causal, spec=p.block_spec())
        return UlyssesPlan(p, _cost(p, sum(kv_exchange.rows)), q_exchange, kv_exchange, tuple(pieces))


def _cost(p: AttentionProblem, keys: int) -> Cost:
    """The exchanges, and the attention of ``H / P`` heads over the whole dim (``keys`` rows below ``kv_len``)."""
    forward, backward = attention_passes(p.batch, p.heads // p.size, p.head_dim, sum(p.pairs(r) for r in range(p.size)))
    e = torch.empty((), dtype=p.dtype).element_size()
    memory = p.batch * p.head_dim * e * (2 * p.heads * p.q_layout.total + 2 * p.kv_heads * keys) // p.size
    return exchange_cost(p, [range(p.size)]) + Cost(Pass(forward), Pass(backward), memory)


@dataclass(frozen=True)
class UlyssesPlan(Plan):
    """The head exchanges of the group and the blocks over the whole dim."""

    traceable: ClassVar[bool] = True  # its collectives trace into a compiled graph

    q_exchange: HeadExchange
    kv_exchange: HeadExchange
    pieces: tuple[Piece, ...]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.problem
        q, k, v = to_heads(q, k, v, p, self.q_exchange, self.kv_exchange)
        return self.q_exchange.to_seq(SpanAttention.apply(q, k, v, list(self.pieces), p.scale))
