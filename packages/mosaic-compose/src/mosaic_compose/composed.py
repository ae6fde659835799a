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

Backend options (``MultiAxisAttention(backend_options=...)``, set by
:class:`ComposedAttention`): ``head_parallel`` (bool, default ``True``;
``False`` runs the sequence strategy on the whole sp group),
``seq_parallel`` (a backend name, default ``"ring"``), ``seq_mesh_shape``
(the inner strategy's ``mesh_shape``, e.g. ``(R, C)`` for ``mesh2d``). Other
keys are handed on to the sequence strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from mosaic.attention import MultiAxisAttention
from mosaic.backend import Backend, Capabilities
from mosaic.layout import SeqLayout
from mosaic.problem import AttentionProblem
from mosaic.registry import BackendUnavailable, get_backend

from .exchange import merge_spans
from .ulysses import head_exchanges, head_split_reasons, to_heads

OPTIONS = ("head_parallel", "seq_parallel", "seq_mesh_shape")


@dataclass(frozen=True)
class _Settings:
    head_size: int
    seq_size: int
    head_parallel: bool
    seq_parallel: str
    seq_mesh_shape: tuple[int, ...] | None
    inner_options: Mapping[str, Any]


def _settings(p: AttentionProblem) -> tuple[_Settings | None, list[str]]:
    """The options read from ``p``, or the reasons they are unusable."""
    o, reasons = p.options, []
    shape = p.mesh_shape
    if shape is None:  # the declared capability (needs_mesh_shape) says so
        return None, []
    if len(shape) != 2 or any(not isinstance(n, int) or n < 1 for n in shape):
        reasons.append(f"mesh_shape must be (h, s), two positive ints, got {shape}")
    head_parallel = o.get("head_parallel", True)
    if not isinstance(head_parallel, bool):
        reasons.append(f"backend option head_parallel must be a bool, got {head_parallel!r}")
    seq_parallel = o.get("seq_parallel", "ring")
    if not isinstance(seq_parallel, str):
        reasons.append(f"backend option seq_parallel must be a backend name, got {seq_parallel!r}")
    elif seq_parallel == "composed":
        reasons.append("seq_parallel='composed' would nest the composition in itself; choose e.g. 'ring'")
    seq_mesh_shape = o.get("seq_mesh_shape")
    if seq_mesh_shape is not None:
        if not isinstance(seq_mesh_shape, tuple | list) or any(not isinstance(n, int) for n in seq_mesh_shape):
            reasons.append(f"backend option seq_mesh_shape must be a tuple of ints, got {seq_mesh_shape!r}")
        else:
            seq_mesh_shape = tuple(seq_mesh_shape)
    if reasons:
        return None, reasons
    h, s = shape
    if h * s != p.size:
        reasons.append(f"mesh_shape {shape} has {h * s} ranks but the sp group has {p.size}; use (h, {p.size} // h)")
    if head_parallel:
        where = f"the head axis (h = {h} of mesh_shape {shape})"
        hint = "choose an h that divides both head counts, or head_parallel=False"
        reasons += head_split_reasons(p.heads, p.kv_heads, h, where, hint)
    rest = MappingProxyType({k: v for k, v in o.items() if k not in OPTIONS})
    return _Settings(h, s, head_parallel, seq_parallel, seq_mesh_shape, rest), reasons


def _inner_problem(p: AttentionProblem, cfg: _Settings, seq_group: dist.ProcessGroup | None = None) -> AttentionProblem:
    """What the sequence strategy runs; ``seq_group`` is left out while checking."""
    if not cfg.head_parallel:
        return dataclasses.replace(p, mesh_shape=cfg.seq_mesh_shape, options=cfg.inner_options)
    h, s = cfg.head_size, cfg.seq_size
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
        mesh_shape=cfg.seq_mesh_shape,
        options=cfg.inner_options,
    )


class ComposedBackend(Backend):
    """Ulysses over the ``h`` mesh axis, a sequence strategy over the ``s`` axis."""

    name = "composed"
    capabilities = Capabilities(needs_mesh_shape=True)

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        p = problem
        cfg, reasons = _settings(p)
        if cfg is None or reasons:
            return reasons
        try:
            inner_backend = get_backend(cfg.seq_parallel)
        except BackendUnavailable as exc:
            return [f"seq_parallel={cfg.seq_parallel!r}: {exc}"]
        inner = _inner_problem(p, cfg)
        if not inner_backend.capabilities.distributed and inner.size > 1:
            return [
                f"seq_parallel={cfg.seq_parallel!r} attends within one rank, so it needs s = 1 "
                f"(mesh_shape ({p.size}, 1) with head_parallel=True); the sequence axis has {inner.size} ranks"
            ]
        if inner_backend.capabilities.needs_mesh_shape and cfg.seq_mesh_shape is None:
            return [
                f"seq_parallel={cfg.seq_parallel!r} needs backend option seq_mesh_shape "
                f"(its own mesh over the {inner.size} ranks of the sequence axis)"
            ]
        return [f"seq_parallel={cfg.seq_parallel!r}: {r}" for r in inner_backend.not_supported_reasons(inner)]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        """Composed attention; callers check ``problem`` first (:meth:`check`), as ``MultiAxisAttention`` does."""
        p = problem
        cfg, reasons = _settings(p)
        if cfg is None or reasons:
            self.check(p)
        inner_backend = get_backend(cfg.seq_parallel)
        if not cfg.head_parallel:
            inner = _inner_problem(p, cfg)
            inner_backend.check(inner)
            return inner_backend.attention(q, k, v, inner)
        h = cfg.head_size
        grid = p.context.grid((cfg.seq_size, h), ("seq", "head"), p.group)
        seq, head = grid.coords
        inner = _inner_problem(p, cfg, grid.group("seq"))
        inner_backend.check(inner)
        q_exchange, kv_exchange = head_exchanges(p, range(seq * h, (seq + 1) * h), grid.group("head"), head)
        q, k, v = to_heads(q, k, v, p, q_exchange, kv_exchange)
        return q_exchange.to_seq(inner_backend.attention(q, k, v, inner))


class ComposedAttention(MultiAxisAttention):
    """``MultiAxisAttention`` with ``backend="composed"``: head parallel x sequence parallel.

    Args:
        mesh_shape: ``(h, s)``, ``h * s`` = the sp group size. The ``h`` ranks of a head
            group are contiguous sp ranks (intra-node under torchrun's rank order);
            ``s`` ranks with the same head coordinate run the sequence strategy.
        head_parallel: ``False`` runs ``seq_parallel`` on the whole sp group.
        seq_parallel: the sequence strategy's backend name (``"ring"``, ``"allgather"``,
            ``"mesh2d"``, ``"local"`` when ``s = 1``).
        embed_dim, num_heads, attention_axis: as for ``MultiAxisAttention``; ``num_heads``
            (and ``num_kv_heads``) must be divisible by ``h``.
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
        mesh_shape = tuple(mesh_shape)
        if len(mesh_shape) != 2:
            raise ValueError(f"mesh_shape must be (h, s), got {mesh_shape}")
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
