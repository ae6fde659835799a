"""Mosaic's shards as one packed sequence whose MagiAttention dispatch is the identity.

MagiAttention attends over one sequence of tokens ``(tokens, heads, head_dim)``
cut into chunks that its dispatch spreads over the cp group; the mask is a list
of slices ``(q range, k range, FULL | CAUSAL)`` in global token indices. Mosaic
holds ``(batch', heads, seq_local, head_dim)`` on every rank of the sp group,
each rank its own spans of the attention dim (contiguous or zigzag). This
module picks the one packing for which MagiAttention's *sequential* dispatch
(chunk ``i`` of ``P * m`` goes to rank ``i // m``) hands every rank exactly the
rows it already holds, in its own order, so no token moves::

    packed token = rank * block + entry * rows + local row        block = batch' * rows

      rank 0 block                      rank 1 block
    | entry 0 | entry 1 | ... |       | entry 0 | entry 1 | ... |
    |<-rows ->|                        (each entry: the rank's rows, then pad rows)

``rows`` is the longest shard, rounded up until ``block`` splits into ``m``
chunks (``m`` = MagiAttention's minimum chunks per rank, 8 by default): uneven
shards and the chunk rule then cost at most ``m - 1`` pad rows per entry, which
are in no slice, so they are neither computed nor sent.

Keys of one entry are not contiguous in this order (each rank's rows of it sit
in that rank's block), so a query piece (entry, rank, span) gets one slice per
key piece (entry, rank', span') that it can see: ``batch' x pieces^2`` slices,
``pieces`` = spans over all ranks (``P`` contiguous, ``2P`` zigzag). ``kv_len``
clips every key piece to the prefix (pieces past it vanish); causal attention
gives a FULL slice for a key piece wholly before the query piece and a
bottom-right CAUSAL slice on the diagonal. Slices never overlap in the
(query, key) plane, so every visible pair is computed exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mosaic.sdk import AttentionProblem, Span

__all__ = ["FFA_HEAD_DIMS", "PackedMask", "pack_mask", "padded_head_dim"]

# Head dims MagiAttention's FFA kernels are built for on sm_90 (24 failed to compile: smaller ones are padded).
FFA_HEAD_DIMS = (64, 128)

Range = tuple[int, int]


def padded_head_dim(head_dim: int) -> int | None:
    """The FFA head dim a head dim is zero-padded to, or ``None`` above the largest."""
    return next((d for d in FFA_HEAD_DIMS if head_dim <= d), None)


@dataclass(frozen=True)
class PackedMask:
    """The packed sequence of one problem and its slices, the same on every rank.

    Attributes:
        batch: entries (batch') per rank.
        size: ranks of the cp (= sp) group.
        rows: rows each entry occupies in a rank's block (its shard, then pad rows).
        chunk_size: MagiAttention's dispatch chunk; ``block`` is a multiple of it.
        q_ranges: the query slices, in packed token indices.
        k_ranges: the key slices, in packed token indices.
        causal: per slice, CAUSAL (bottom-right aligned) rather than FULL.
    """

    batch: int
    size: int
    rows: int
    chunk_size: int
    q_ranges: tuple[Range, ...]
    k_ranges: tuple[Range, ...]
    causal: tuple[bool, ...]

    @property
    def block(self) -> int:
        """Packed tokens per rank."""
        return self.batch * self.rows

    @property
    def total(self) -> int:
        return self.size * self.block

    def mask_types(self) -> list[str]:
        """Per slice, MagiAttention's mask type name."""
        return ["causal" if c else "full" for c in self.causal]

    def remote_keys(self, rank: int) -> int:
        """Key tokens of other ranks that ``rank``'s queries see: what MagiAttention fetches for it."""
        lo, hi = rank * self.block, (rank + 1) * self.block
        wanted = sorted(
            k for q, k in zip(self.q_ranges, self.k_ranges, strict=True) if lo <= q[0] < hi and not lo <= k[0] < hi
        )
        total, end = 0, -1
        for a, b in wanted:  # the union of the ranges: a key fetched once serves every slice that needs it
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def pairs(self, rank: int, local: bool = False) -> int:
        """(query, key) pairs of ``rank``'s queries over all entries, one head; with ``local``, its own keys only."""
        lo, hi = rank * self.block, (rank + 1) * self.block
        total = 0
        for (qa, qe), (ka, ke), causal in zip(self.q_ranges, self.k_ranges, self.causal, strict=True):
            if lo <= qa < hi and (not local or lo <= ka < hi):
                n, m = qe - qa, ke - ka
                # bottom-right causal: query qe-1-j sees m-j keys
                total += (m * n - n * (n - 1) // 2) if causal else n * m
        return total


def pack_mask(problem: AttentionProblem, min_chunks: int = 8) -> PackedMask:
    """The packing and slices of ``problem`` (self-attention: queries and keys share one layout)."""
    p = problem
    layout = p.q_layout
    # pieces[r]: (global span, local row of its start) of rank r
    pieces = [_with_offsets(layout.spans(r)) for r in range(p.size)]
    rows = max(1, max(layout.lengths))
    while (p.batch * rows) % min_chunks:
        rows += 1
    block = p.batch * rows
    q_ranges: list[Range] = []
    k_ranges: list[Range] = []
    causal: list[bool] = []
    for b in range(p.batch):
        for rq in range(p.size):
            q_base = rq * block + b * rows
            for (qa, qe), q_row in pieces[rq]:
                for rk in range(p.size):
                    k_base = rk * block + b * rows
                    for (ka, ke), k_row in pieces[rk]:
                        if p.kv_len is not None:
                            ke = min(ke, p.kv_len)
                        if ke <= ka:
                            continue
                        for (s, t), (u, w), tri in _visible((qa, qe), (ka, ke), p.causal):
                            q_ranges.append((q_base + q_row + s - qa, q_base + q_row + t - qa))
                            k_ranges.append((k_base + k_row + u - ka, k_base + k_row + w - ka))
                            causal.append(tri)
    return PackedMask(p.batch, p.size, rows, block // min_chunks, tuple(q_ranges), tuple(k_ranges), tuple(causal))


def _with_offsets(spans: tuple[Span, ...]) -> list[tuple[Span, int]]:
    out, row = [], 0
    for a, b in spans:
        out.append(((a, b), row))
        row += b - a
    return out


def _visible(q: Span, k: Span, causal: bool) -> list[tuple[Span, Span, bool]]:
    """The (query span, key span, is-causal) parts of ``q`` attending to ``k``, in global positions.

    Causal: query ``i`` sees keys ``<= i``. Queries in ``[max(qa, ka), min(qe, ke))``
    see ``[ka, i]``, a bottom-right aligned CAUSAL slice over keys ``[ka, min(qe, ke))``;
    queries at or past ``ke`` see all of ``k``, a FULL slice; queries before ``ka`` none.
    """
    (qa, qe), (ka, ke) = q, k
    if not causal:
        return [(q, k, False)]
    parts = []
    s, t = max(qa, ka), min(qe, ke)
    if t > s:
        parts.append(((s, t), (ka, t), True))
    f = max(qa, ke)
    if qe > f:
        parts.append(((f, qe), k, False))
    return parts
