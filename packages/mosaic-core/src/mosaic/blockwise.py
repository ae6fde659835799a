"""Attention between rows at known global positions, built from kernel calls.

Every strategy ends up asking the same question: "these query rows sit at
these global positions, these key rows at those; with ``kv_len`` and
``causal``, which (query rows, key rows) blocks must be computed, and how?"
:func:`blocks` answers it once for all of them. The answer is a list of
:class:`Piece` s, each a full block or a square causal block whose query and
key rows sit at the same positions (so every kernel's causal alignment rule
agrees). :func:`forward` runs those blocks and merges the pieces with their
log-sum-exp; :func:`backward` runs the matching kernel backwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .kernels import BlockSpec, KernelCall, attention_backward, attention_forward, choose_kernel, get_kernel, lse_dtype
from .layout import Span

__all__ = [
    "Partial",
    "Piece",
    "SpanAttention",
    "accumulate",
    "backward",
    "backward_",
    "block_grads",
    "blocks",
    "cut_spans",
    "empty_partial",
    "forward",
    "merge_",
    "span_attention",
]


@dataclass(frozen=True)
class Piece:
    """Query rows ``q`` attend to key rows ``k`` (local row slices); ``causal`` = square diagonal block.

    ``kernel`` names the kernel the plan chose for the block (:func:`blocks` with a ``spec``).
    """

    q: slice
    k: slice
    causal: bool = False
    kernel: str | None = None

    @property
    def q_len(self) -> int:
        return self.q.stop - self.q.start

    @property
    def k_len(self) -> int:
        return self.k.stop - self.k.start


def _rows(spans: tuple[Span, ...]) -> list[tuple[int, int, int]]:
    """``(start, stop, first_row)`` for each span of a local tensor."""
    out, row = [], 0
    for start, stop in spans:
        out.append((start, stop, row))
        row += stop - start
    return out


def cut_spans(spans: tuple[Span, ...], kv_len: int | None) -> tuple[Span, ...]:
    """Key spans restricted to positions ``< kv_len`` (the key prefix), empty spans dropped."""
    if kv_len is None:
        return spans
    return tuple((a, min(b, kv_len)) for a, b in spans if min(b, kv_len) > a)


def blocks(
    q_spans: tuple[Span, ...],
    k_spans: tuple[Span, ...],
    *,
    causal: bool = False,
    kv_len: int | None = None,
    spec: BlockSpec | None = None,
    kernel: str | None = None,
) -> list[Piece]:
    """Blocks to compute for queries at ``q_spans`` over keys at ``k_spans``.

    Key ``j`` is visible to query ``i`` iff ``j < kv_len`` and, when causal,
    ``j <= i``. Rows lists follow the spans in order (a rank's local layout).
    Returns an empty list when no query sees any key. With ``spec`` (the
    device, dtype, head dim and heads of the tensors) every piece gets the
    kernel for its lengths: ``kernel`` if named, else the fastest that accepts
    it (:func:`~mosaic.kernels.choose_kernel`), so a plan runs its choice.
    """
    pieces = _pieces(q_spans, k_spans, causal, kv_len)
    if spec is None:
        return pieces
    return [replace(p, kernel=choose_kernel(spec.sized(p.q_len, p.k_len, p.causal), kernel).name) for p in pieces]


def kernels_of(pieces: Sequence[Piece]) -> list[str]:
    """The kernels a plan's pieces run, each once, in order."""
    return list(dict.fromkeys(p.kernel for p in pieces if p.kernel))


def _pieces(q_spans, k_spans, causal: bool, kv_len: int | None) -> list[Piece]:
    q_rows = _rows(q_spans)
    # Keys past kv_len keep their row numbers; only the rows below kv_len are used.
    k_rows = [(a, min(b, kv_len if kv_len is not None else b), r) for a, b, r in _rows(k_spans)]
    k_rows = [(a, b, r) for a, b, r in k_rows if b > a]
    n_q = sum(b - a for a, b, _ in q_rows)
    if not q_rows or not k_rows or n_q == 0:
        return []
    if not causal:
        return _coalesce(
            [Piece(slice(qr, qr + qb - qa), slice(kr, kr + kb - ka)) for qa, qb, qr in q_rows for ka, kb, kr in k_rows]
        )
    if [(a, b) for a, b, _ in q_rows] == [(a, b) for a, b, _ in k_rows] and _ascending(q_rows):
        # Same positions in the same ascending order: one top-left causal block.
        return [Piece(slice(0, n_q), slice(0, n_q), causal=True)]
    pieces: list[Piece] = []
    for qa, qb, qr in q_rows:
        for ka, kb, kr in k_rows:
            pieces.extend(_causal_pair(qa, qb, qr, ka, kb, kr))
    return _coalesce(pieces)


def _ascending(rows: list[tuple[int, int, int]]) -> bool:
    return all(b <= a2 for (_, b, _), (a2, _, _) in itertools.pairwise(rows))


def _causal_pair(qa: int, qb: int, qr: int, ka: int, kb: int, kr: int) -> list[Piece]:
    """Causal blocks between one query span and one key span."""
    if kb - 1 <= qa:  # every key is at or before the first query
        return [Piece(slice(qr, qr + qb - qa), slice(kr, kr + kb - ka))]
    if ka >= qb:  # every key is after the last query
        return []
    out = []
    if ka < qa:  # keys before the first query: seen by all queries
        out.append(Piece(slice(qr, qr + qb - qa), slice(kr, kr + qa - ka)))
    lo, hi = max(ka, qa), min(kb, qb)  # positions held by both sides
    q_lo, k_lo = qr + lo - qa, kr + lo - ka
    out.append(Piece(slice(q_lo, q_lo + hi - lo), slice(k_lo, k_lo + hi - lo), causal=True))
    if hi < qb:  # queries after the shared positions see all of them
        out.append(Piece(slice(q_lo + hi - lo, qr + qb - qa), slice(k_lo, k_lo + hi - lo)))
    return out


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Join full blocks that touch along one side, so kernels get fewer, larger calls."""
    pieces = list(pieces)
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(pieces):
            for j in range(i + 1, len(pieces)):
                b = pieces[j]
                if a.causal or b.causal:
                    continue
                joined = _join(a, b) or _join(b, a)
                if joined:
                    pieces[i] = joined
                    del pieces[j]
                    merged = True
                    break
            if merged:
                break
    return pieces


def _join(a: Piece, b: Piece) -> Piece | None:
    if a.q == b.q and a.k.stop == b.k.start:
        return Piece(a.q, slice(a.k.start, b.k.stop))
    if a.k == b.k and a.q.stop == b.q.start:
        return Piece(slice(a.q.start, b.q.stop), a.k)
    return None


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a partial result into an accumulator, in place (fp32 ``out``/``lse``).

    The weights are ``sigmoid(+-(block_lse - lse))``, which sum to one to the last bit:
    the form ``exp(lse - logaddexp(...))`` rounds the merged ``lse`` first, and an ulp
    of a large ``lse`` (large logits) then scaled every row, which cost the gradients
    8x the error of one kernel over all keys (tests/test_precision.py).
    Rows with no key on either side (``lse = -inf``) stay ``out = 0, lse = -inf``: no NaN.
    Two passes over ``out`` (scale, then add the weighted block); the rest is per row.
    """
    gap = block_lse - lse
    gap = gap.masked_fill(torch.isnan(gap), 0.0)  # both -inf: neither side has a key
    out.mul_(torch.sigmoid(-gap).unsqueeze(-1)).addcmul_(block_out, torch.sigmoid(gap).unsqueeze(-1))
    lse.copy_(torch.logaddexp(lse, block_lse))


class Partial:
    """Attention of the local queries to the key blocks seen so far: fp32 ``out`` and ``lse``.

    The first block is taken as it is (no merge into zeros); :meth:`result`
    gives ``out = 0, lse = -inf`` when no block had a visible key.
    """

    def __init__(self, q: torch.Tensor):
        self.q = q
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = block_out.to(lse_dtype(self.q.dtype)), block_lse
        else:
            merge_(self.out, self.lse, block_out, block_lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            return empty_partial(self.q)
        return self.out, self.lse


def empty_partial(q: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators for ``rows`` query rows (default all): ``out = 0``, ``lse = -inf``."""
    b, h, n, d = q.shape
    n = n if rows is None else rows
    acc = lse_dtype(q.dtype)
    out = torch.zeros(b, h, n, d, dtype=acc, device=q.device)
    return out, torch.full((b, h, n), float("-inf"), dtype=acc, device=q.device)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pieces: list[Piece],
    scale: float,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[KernelCall | None]]:
    """Run blocks on the kernels their pieces name (else ``kernel``, else the fastest): ``(out, lse, calls)``;
    ``out`` is fp32 unless one piece covers every query row."""
    if len(pieces) == 1 and pieces[0].q == slice(0, q.shape[2]):
        p = pieces[0]
        out, lse, call = attention_forward(
            q, k[:, :, p.k], v[:, :, p.k], causal=p.causal, scale=scale, kernel=_kernel(p, kernel)
        )
        return out, lse, [call]
    out, lse = empty_partial(q)
    calls = []
    for p in pieces:
        block_out, block_lse, call = attention_forward(
            q[:, :, p.q], k[:, :, p.k], v[:, :, p.k], causal=p.causal, scale=scale, kernel=_kernel(p, kernel)
        )
        merge_(out[:, :, p.q], lse[:, :, p.q], block_out, block_lse)
        calls.append(call)
    return out, lse, calls


def accumulate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: Sequence[Piece], scale: float, partial: Partial
) -> list[KernelCall | None]:
    """Fold the attention of ``q`` to one key block (``pieces`` of it) into ``partial``.

    Returns the kernel calls, which :func:`block_grads` needs with the same pieces.
    """
    calls: list[KernelCall | None] = []
    if pieces:
        block_out, block_lse, calls = forward(q, k, v, list(pieces), scale)
        partial.add(block_out, block_lse)
    return calls


def backward_(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pieces: list[Piece],
    calls: list[KernelCall | None],
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Add the blocks' gradients into ``dq, dk, dv`` (accumulators shaped like q, k, v)."""
    for p, call in zip(pieces, calls, strict=True):
        g = attention_backward(
            dout[:, :, p.q],
            q[:, :, p.q],
            k[:, :, p.k],
            v[:, :, p.k],
            out[:, :, p.q],
            lse[:, :, p.q],
            call,
            causal=p.causal,
            scale=scale,
        )
        dq[:, :, p.q] += g[0]
        dk[:, :, p.k] += g[1]
        dv[:, :, p.k] += g[2]


def _whole(pieces: list[Piece], q: torch.Tensor, k: torch.Tensor) -> bool:
    """One full piece covering every query and key row: the kernel's gradients are the blocks'."""
    return len(pieces) == 1 and pieces[0].q == slice(0, q.shape[2]) and pieces[0].k == slice(0, k.shape[2])


def block_grads(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pieces: list[Piece],
    calls: list[KernelCall | None],
    scale: float,
    dq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Add one key block's share of dQ into ``dq`` (fp32); return the block's ``(dk, dv)``, unrounded.

    ``None`` when no query sees the block. For a caller that sums dK/dV over
    ranks: it adds them straight into its accumulator, with no zeroed copy.
    """
    if not pieces:
        return None
    if _whole(pieces, q, k):
        dq_block, dk, dv = attention_backward(dout, q, k, v, out, lse, calls[0], causal=pieces[0].causal, scale=scale)
        dq += dq_block
        return dk, dv
    dk, dv = (torch.zeros(t.shape, dtype=dq.dtype, device=t.device) for t in (k, v))
    backward_(dout, q, k, v, out, lse, pieces, calls, scale, dq, dk, dv)
    return dk, dv


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pieces: list[Piece],
    calls: list[KernelCall | None],
    scale: float,
    round_kv: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of blocks; dq in q's dtype, dk/dv in k's and v's or, with ``round_kv=False``,
    unrounded (fp32 when they were summed over blocks or grouped heads) for a caller that sums them further."""
    if len(pieces) == 1 and pieces[0].q == slice(0, q.shape[2]):
        # One kernel call (keys maybe cut to kv_len): its gradients, with no fp32 accumulators.
        p = pieces[0]
        dq, dk, dv = attention_backward(
            dout, q, k[:, :, p.k], v[:, :, p.k], out, lse, calls[0], causal=p.causal, scale=scale
        )
        dk, dv = _placed(dk, k, p.k), _placed(dv, v, p.k)
    else:
        dq = torch.zeros(q.shape, dtype=lse_dtype(q.dtype), device=q.device)
        grads = block_grads(dout, q, k, v, out, lse, pieces, calls, scale, dq)
        dk, dv = grads or (torch.zeros(t.shape, dtype=dq.dtype, device=t.device) for t in (k, v))
    if round_kv:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq.to(q.dtype), dk, dv


def _placed(grad: torch.Tensor, like: torch.Tensor, rows: slice) -> torch.Tensor:
    """``grad`` of key rows ``rows`` as the gradient of all of ``like``'s rows (zeros elsewhere)."""
    if rows == slice(0, like.shape[2]):
        return grad
    full = grad.new_zeros((*like.shape[:2], like.shape[2], grad.shape[3]))
    full[:, :, rows] = grad
    return full


def _kernel(piece: Piece, kernel: str | None):
    """The kernel a plan chose for ``piece`` (run as it is), else ``kernel`` by name (checked), else ``None``."""
    return get_kernel(piece.kernel) if piece.kernel else kernel


def _strided(q: torch.Tensor, k: torch.Tensor, pieces: list[Piece], kernel: str | None) -> bool:
    """Whether every kernel of ``pieces`` reads its inputs through their strides (no copy is worth making)."""
    if not pieces:
        return True
    names = {p.kernel or kernel for p in pieces}
    if None in names:
        names.discard(None)
        names.add(choose_kernel(BlockSpec.of(q, k)).name)
    return all(get_kernel(name).strided_inputs for name in names)


class SpanAttention(torch.autograd.Function):
    """Differentiable attention over blocks (used by strategies whose keys are all local)."""

    @staticmethod
    def forward(ctx, q, k, v, pieces: list[Piece], scale: float, kernel: str | None = None):
        # Projections hand over strided views. Most kernels want contiguous rows: copied once here and
        # saved in place of the views, the projection's output is freed after the forward, and the
        # backward's kernels need no copies of their own. A kernel that reads strides gets the views.
        if not _strided(q, k, pieces, kernel):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, calls = forward(q, k, v, pieces, scale, kernel)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.calls, ctx.scale = pieces, calls, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        # dout as it comes (the output projection's gradient, transposed): each kernel lays out what it needs.
        dq, dk, dv = backward(dout, q, k, v, out, lse, ctx.pieces, ctx.calls, ctx.scale)
        return dq, dk, dv, None, None, None


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_spans: tuple[Span, ...],
    k_spans: tuple[Span, ...],
    *,
    causal: bool = False,
    kv_len: int | None = None,
    scale: float,
) -> torch.Tensor:
    """Differentiable attention of queries at ``q_spans`` over keys at ``k_spans`` (all local).

    With no query rows the result is empty but still depends on k and v, so a
    collective in their backward runs on every rank.
    """
    pieces = blocks(q_spans, k_spans, causal=causal, kv_len=kv_len)
    return SpanAttention.apply(q, k, v, pieces, scale)
