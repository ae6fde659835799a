"""``mesh2d``: 2-D tile attention on an ``R x C`` mesh of the sp group.

Rank ``(i, j)`` (sp rank ``i * C + j``) computes one tile of the attention
matrix: the queries of its row group ``(i, *)`` against the keys of its column
group ``(*, j)``. Query shard ``a`` and key shard ``b`` meet on rank
``(a // C, b % C)`` only, so every (query shard, key shard) pair is computed
exactly once.

Forward:
  1. all-gather Q along the row group and K,V (one tensor) along the column group;
  2. run the tile's blocks (:func:`mosaic.blockwise.blocks`) into a partial ``(out, lse)``;
  3. all-to-all the partials (fp32, ``lse`` as one more channel) back to the
     owners of the query rows, who merge the ``C`` partials with their
     log-sum-exp: a reduce-scatter whose reduction is the softmax merge.

Backward, the mirror: all-gather ``(dout, out, lse)`` along the row group (the
kernels' backward needs the final ``out``/``lse`` of every tile query), run
the tile's kernel backwards, reduce-scatter dQ along the row group and dK,dV
along the column group, summed in fp32.

Only key rows below ``kv_len`` are gathered. Causal attention is exact for
any layout; ``layout="zigzag"`` balances it (every (query shard, key shard)
pair then holds the same causal work, so every tile does).

Bytes reaching one rank, for ``n`` query rows and ``m`` kept key rows per rank,
batch ``B``, element size ``e`` (``f`` = 4, 8 for fp64, the fp32 accumulation):

- forward  ``B n (C-1) H (d e + (d+1) f) + B m (R-1) 2 Hkv d e``
- backward ``B n (C-1) H (2 d e + f + d f) + B m (R-1) 2 Hkv d f``

against ring's ``B m (P-1) 2 Hkv d e`` forward and ``B m ((P-1) 2 Hkv d e + P 2 Hkv d f)``
backward. The query side costs ``~2 (C-1) H`` per row, the key side ``2 (R-1) Hkv``:
at P = 4 on (2, 2) with MHA in fp32 that is ~4 n H d elements forward and ~9 in all,
against ring's 6 and 20; with few kv heads a tall mesh (large R) is cheaper.
:func:`comm_bytes` gives the numbers. Memory: the gathered tile, ``O((C n H + R m Hkv) d)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mosaic.sdk import (
    LAYOUTS,
    AttentionProblem,
    Backend,
    BackendNotSupported,
    Capabilities,
    Context,
    Cost,
    KeyBlock,
    Options,
    Pass,
    Piece,
    Plan,
    all_gather_uneven,
    all_to_all_uneven,
    attention_passes,
    backward_,
    block_forward,
    blocks,
    check_shape,
    empty_partial,
    lse_dtype,
    merge_,
    reduce_scatter_uneven,
    span_plan,
)

from .grid import mesh_groups

__all__ = ["Mesh2DBackend", "Mesh2DOptions", "Tile", "comm_bytes"]


@dataclass(frozen=True)
class Mesh2DOptions(Options):
    """Options of ``mesh2d``.

    Args:
        mesh_shape: ``(R, C)``, ``R * C`` = the sp group size; sp rank ``i * C + j`` sits at
            ``(i, j)``. Queries are gathered along rows (``C`` ranks), keys along columns
            (``R`` ranks): with few kv heads a tall mesh (large ``R``) moves less.
    """

    mesh_shape: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mesh_shape", check_shape("mesh_shape", self.mesh_shape, 2))


class Mesh2DBackend(Backend):
    """2-D tile attention over the sp group arranged as ``mesh_shape = (R, C)``."""

    name = "mesh2d"
    capabilities = Capabilities(layouts=frozenset({*LAYOUTS, "grid"}))
    Options = Mesh2DOptions

    def candidate_options(self, problem: AttentionProblem) -> list[Options]:
        """Every proper factorisation ``R x C`` of the group (``R, C >= 2``; the others are rings)."""
        p = problem.size
        return [Mesh2DOptions((r, p // r)) for r in range(2, p // 2 + 1) if p % r == 0]

    def prepare(self, context: Context, options: Options) -> None:
        rows, cols = options.mesh_shape
        if rows * cols != context.sp_size:
            raise BackendNotSupported(
                f"backend 'mesh2d': mesh_shape {(rows, cols)} has {rows * cols} ranks but the sp group has "
                f"{context.sp_size}; choose (R, C) with R * C = {context.sp_size}"
            )
        if context.sp_size > 1:
            mesh_groups(context, (rows, cols))

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        p, reasons = problem, []
        rows, cols = p.options.mesh_shape
        if rows * cols != p.size:
            reasons.append(
                f"mesh_shape {(rows, cols)} has {rows * cols} ranks but the sp group has {p.size}; "
                f"choose (R, C) with R * C = {p.size}"
            )
        if p.causal and p.q_layout.kind == "grid":
            reasons.append(
                "causal=True over a 2-D grid (MultiAxisAttention2D) is not supported: a raster-order causal mask "
                "splits each tile into one block per row of the grid"
            )
        return reasons

    def estimate(self, problem: AttentionProblem) -> Cost:
        return span_plan(problem).cost if problem.size == 1 else _cost(problem)

    def plan(self, problem: AttentionProblem) -> Plan:
        return span_plan(problem) if problem.size == 1 else Tile.of(problem)


@dataclass(frozen=True)
class Tile(Plan):
    """What rank ``(i, j)`` exchanges and computes, derived from the problem once (plans are cached)."""

    row_group: dist.ProcessGroup
    col_group: dist.ProcessGroup
    q_sizes: tuple[int, ...]  # query rows of each rank of the row group
    key_sizes: tuple[int, ...]  # kept key rows of each rank of the column group
    own_keys: KeyBlock  # this rank's key rows below kv_len
    pieces: tuple[Piece, ...]
    own_rows: int

    @classmethod
    def of(cls, p: AttentionProblem) -> Tile:
        rows, cols = p.options.mesh_shape
        i, j = divmod(p.rank, cols)
        row_group, col_group = mesh_groups(p.context, (rows, cols), p.group)
        q_ranks = [i * cols + c for c in range(cols)]
        key_blocks = [p.kv_block(r * cols + j) for r in range(rows)]
        q_sizes = tuple(p.q_layout.lengths[r] for r in q_ranks)
        key_sizes = tuple(b.size for b in key_blocks)
        if p.causal:
            q_spans = tuple(s for r in q_ranks for s in p.q_layout.spans(r))
            pieces = blocks(q_spans, tuple(s for b in key_blocks for s in b.spans), causal=True, spec=p.block_spec())
        else:
            # Without a causal mask positions no longer matter: keys past kv_len were never gathered.
            pieces = blocks(((0, sum(q_sizes)),), ((0, sum(key_sizes)),), spec=p.block_spec())
        return cls(p, _cost(p), row_group, col_group, q_sizes, key_sizes, key_blocks[i], tuple(pieces), q_sizes[j])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return Mesh2DAttention.apply(q, k, v, self)


def _cost(p: AttentionProblem) -> Cost:
    """The busiest rank: :func:`comm_bytes` with the largest shards; tile FLOPs of the busiest tile."""
    rows, cols = p.options.mesh_shape
    kept = [p.kv_block(r).size for r in range(p.size)]
    forward, backward = comm_bytes(
        (rows, cols), batch=p.batch, heads=p.heads, kv_heads=p.kv_heads, head_dim=p.head_dim,
        q_rows=max(p.q_layout.lengths), kv_rows=max(kept), dtype=p.dtype,
    )  # fmt: skip
    e, f = torch.empty((), dtype=p.dtype).element_size(), 4
    tile_q, tile_k = cols * max(p.q_layout.lengths), rows * max(kept)
    forward_flops, backward_flops = attention_passes(p.batch, p.heads, p.head_dim, p.busiest_pairs())
    return Cost(
        Pass(forward_flops, forward, 0.0, 3),  # gather Q along the row, K/V along the column; scatter the merge
        Pass(backward_flops, backward, 0.0, 4),
        memory=p.batch * p.head_dim * (tile_q * p.heads * (e + 2 * f) + tile_k * 2 * p.kv_heads * (e + f)),
    )


def _gather(x: torch.Tensor, sizes: tuple[int, ...], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return x if len(sizes) == 1 else all_gather_uneven(x, list(sizes), dim, group)


def _scatter(x: torch.Tensor, sizes: tuple[int, ...], dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return x if len(sizes) == 1 else reduce_scatter_uneven(x, list(sizes), dim, group)


def _merge_partials(out: torch.Tensor, lse: torch.Tensor, t: Tile) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row group rank's partial ``(out, lse)`` of this rank's query rows, merged (fp32)."""
    cols, own, d = len(t.q_sizes), t.own_rows, out.shape[-1]
    packed = torch.cat([out.to(lse.dtype), lse.unsqueeze(-1)], -1)
    parts = all_to_all_uneven(packed, list(t.q_sizes), [own] * cols, 2, t.row_group).unflatten(2, (cols, own))
    merged_out, merged_lse = empty_partial(out, own)
    for c in range(cols):
        merge_(merged_out, merged_lse, parts[:, :, c, :, :d], parts[:, :, c, :, d])
    return merged_out, merged_lse


def _pack_for_tile(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``(dout, out, lse)`` as one tensor of dout's dtype, so one all-gather carries them.

    ``lse`` keeps its fp32 bits: it is reinterpreted, not converted.
    """
    return torch.cat([dout, out.to(dout.dtype), lse.contiguous().unsqueeze(-1).view(dout.dtype)], -1)


def _unpack_for_tile(
    packed: torch.Tensor, d: int, lse_type: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed[..., :d], packed[..., d : 2 * d], packed[..., 2 * d :].contiguous().view(lse_type).squeeze(-1)


class Mesh2DAttention(torch.autograd.Function):
    """The tile exchange: this rank's query rows in, their attention output out; differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, t: Tile):
        q_tile = _gather(q, t.q_sizes, 2, t.row_group)
        # K and V travel as one tensor: one collective each way instead of two.
        kv_tile = _gather(torch.stack([t.own_keys.take(k), t.own_keys.take(v)]), t.key_sizes, 3, t.col_group)
        out, lse, calls = block_forward(q_tile, kv_tile[0], kv_tile[1], list(t.pieces), t.problem.scale)
        if len(t.q_sizes) > 1:
            out, lse = _merge_partials(out, lse, t)
        out = out.to(q.dtype)
        ctx.save_for_backward(q_tile, kv_tile, out, lse)
        ctx.tile, ctx.calls, ctx.kv_meta = t, calls, (k.shape, k.dtype, k.device)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_tile, kv_tile, out, lse = ctx.saved_tensors
        t: Tile = ctx.tile
        d = q_tile.shape[-1]
        if len(t.q_sizes) > 1:
            packed = _gather(_pack_for_tile(dout, out, lse), t.q_sizes, 2, t.row_group)
            dout, out, lse = _unpack_for_tile(packed, d, lse.dtype)
        acc = lse_dtype(q_tile.dtype)
        dq = torch.zeros(q_tile.shape, dtype=acc, device=q_tile.device)
        dkv = torch.zeros(kv_tile.shape, dtype=acc, device=kv_tile.device)
        backward_(
            dout,
            q_tile,
            kv_tile[0],
            kv_tile[1],
            out,
            lse,
            list(t.pieces),
            ctx.calls,
            t.problem.scale,
            dq,
            dkv[0],
            dkv[1],
        )
        dq = _scatter(dq, t.q_sizes, 2, t.row_group)
        dkv = _scatter(dkv, t.key_sizes, 3, t.col_group)
        shape, dtype, device = ctx.kv_meta
        # Only shape and dtype of the local K/V are needed to place the rows: put() reads nothing else.
        dk, dv = t.own_keys.put(dkv.to(dtype), torch.empty((2, *shape), dtype=dtype, device=device), dim=3)
        return dq.to(q_tile.dtype), dk, dv, None


def comm_bytes(
    mesh_shape: tuple[int, int],
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    q_rows: int,
    kv_rows: int,
    dtype: torch.dtype,
) -> tuple[int, int]:
    """``(forward, backward)`` bytes that reach one rank, every rank holding ``q_rows`` queries and ``kv_rows`` keys.

    ``kv_rows`` counts the key rows below ``kv_len`` only. These are the bytes
    :func:`mosaic.comm.count_traffic` reports for one call.
    """
    rows, cols = check_shape("mesh_shape", mesh_shape, 2)
    e, f = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=lse_dtype(dtype)).element_size()
    b, h, hkv, d, n, m = batch, heads, kv_heads, head_dim, q_rows, kv_rows
    forward = b * n * (cols - 1) * h * (d * e + (d + 1) * f) + b * m * (rows - 1) * 2 * hkv * d * e
    backward = b * n * (cols - 1) * h * (2 * d * e + f + d * f) + b * m * (rows - 1) * 2 * hkv * d * f
    return forward, backward
