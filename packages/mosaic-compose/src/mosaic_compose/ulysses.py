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

import torch
import torch.distributed as dist

from mosaic.backend import Backend, Capabilities
from mosaic.blockwise import span_attention
from mosaic.problem import AttentionProblem

from .exchange import HeadExchange


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
            "group size, or a sequence strategy ('ring', 'allgather')"
        )
        return head_split_reasons(problem.heads, problem.kv_heads, problem.size, "the sp group", hint)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        p = problem
        q_exchange, kv_exchange = head_exchanges(p, range(p.size), p.group, p.rank)
        q, k, v = to_heads(q, k, v, p, q_exchange, kv_exchange)
        out = span_attention(q, k, v, q_exchange.positions, kv_exchange.positions, causal=p.causal, scale=p.scale)
        return q_exchange.to_seq(out)
