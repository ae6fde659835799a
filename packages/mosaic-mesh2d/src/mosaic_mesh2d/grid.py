"""The sp group as an ``R x C`` mesh, and a tensor sharded over two of its dims on it.

Rank ``s`` of the sp group sits at mesh coordinates ``(i, j) = divmod(s, C)``
(row-major, as :meth:`mosaic.Context.grid` lays it out). Its *row group* is
the ranks ``(i, *)``, its *column group* the ranks ``(*, j)``.

:class:`MultiAxisAttention2D <mosaic_mesh2d.MultiAxisAttention2D>` shards
``dim1`` over the mesh rows and ``dim2`` over the mesh columns: rank ``(i, j)``
holds the block ``rows_i x cols_j`` (lengths as ``torch.tensor_split``). The
joint sequence ``dim1 x dim2`` is numbered row-major, position ``a1 * N2 + a2``;
:class:`GridLayout` says which positions each rank holds.

Naming rule (as in mosaic.context): a *mesh axis* is an axis of the rank grid,
a *dim* is a tensor dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mosaic.sdk import Context, SeqLayout, Span, all_gather_uneven


def check_mesh_shape(mesh_shape: tuple[int, ...] | None) -> tuple[int, int]:
    """``mesh_shape`` as ``(R, C)``; a ``ValueError`` naming it when it is not two positive ints."""
    if mesh_shape is None or len(mesh_shape) != 2 or any(type(n) is not int or n < 1 for n in mesh_shape):
        raise ValueError(f"mesh_shape must be two positive ints (rows, columns), got {mesh_shape!r}")
    return mesh_shape[0], mesh_shape[1]


def mesh_groups(
    ctx: Context, mesh_shape: tuple[int, int], group: dist.ProcessGroup | None = None
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """``(row_group, col_group)`` of this rank in ``group`` (default the sp group; created collectively
    on first use, then cached)."""
    grid = ctx.grid(mesh_shape, ("row", "col"), group)
    i, j = grid.coords
    # The ranks that differ only in their column index make up row i.
    row_group, col_group = grid.group("col"), grid.group("row")
    if dist.get_rank(row_group) != j or dist.get_rank(col_group) != i:
        raise RuntimeError(
            f"sp rank {ctx.sp_rank} sits at mesh ({i}, {j}) but has rank {dist.get_rank(row_group)} in its row "
            f"group and {dist.get_rank(col_group)} in its column group; the sp group's global ranks must ascend "
            "with the sp rank"
        )
    return row_group, col_group


@dataclass(frozen=True)
class GridLayout(SeqLayout):
    """Joint positions ``a1 * N2 + a2`` held by each rank of an ``R x C`` mesh.

    Rank ``(i, j)`` holds ``rows[i]`` consecutive positions along dim1 times
    ``cols[j]`` along dim2, flattened row-major, so its local rows ascend in
    joint position as :class:`~mosaic.layout.SeqLayout` requires. Build it with
    :meth:`of`.
    """

    # A kind beyond core's two: only backends that list "grid" in their layouts accept it.
    kind: str = "grid"  # type: ignore[assignment]
    rows: tuple[int, ...] = ()
    cols: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        expected = tuple(r * c for r in self.rows for c in self.cols)
        if self.kind != "grid" or self.lengths != expected:
            raise ValueError(f"use GridLayout.of(rows, cols); got lengths {self.lengths}, kind {self.kind!r}")

    @classmethod
    def of(cls, rows: tuple[int, ...], cols: tuple[int, ...]) -> GridLayout:
        """The layout of blocks ``rows[i] x cols[j]`` on mesh ``(len(rows), len(cols))``."""
        rows, cols = tuple(rows), tuple(cols)
        return cls(tuple(r * c for r in rows for c in cols), "grid", rows=rows, cols=cols)

    def spans(self, rank: int) -> tuple[Span, ...]:
        """One span per dim1 position of the rank's block; one span in all when it holds whole rows."""
        i, j = divmod(rank, len(self.cols))
        width, first_row, first_col = sum(self.cols), sum(self.rows[:i]), sum(self.cols[:j])
        if self.cols[j] == 0 or self.rows[i] == 0:
            return ()
        if self.cols[j] == width:  # whole rows: the block is one run
            return ((first_row * width, (first_row + self.rows[i]) * width),)
        start = first_row * width + first_col
        return tuple((start + a * width, start + a * width + self.cols[j]) for a in range(self.rows[i]))


def grid_layouts(
    ctx: Context, mesh_shape: tuple[int, int], local_sizes: dict[str, tuple[int, int]]
) -> list[GridLayout]:
    """The :class:`GridLayout` of each named tensor whose block on this rank is ``(n1, n2)`` long.

    One small all-gather over the sp group covers every tensor (:func:`layouts_from_rows`).
    """
    rows, cols = mesh_shape
    if rows * cols != ctx.sp_size:
        raise ValueError(f"mesh_shape {mesh_shape} has {rows * cols} ranks but the sp group has {ctx.sp_size}")
    mine = [n for sizes in local_sizes.values() for n in sizes]
    return layouts_from_rows(ctx.gather_ints(mine), mesh_shape, list(local_sizes))


def layouts_from_rows(table: list[tuple[int, ...]], mesh_shape: tuple[int, int], names: list[str]) -> list[GridLayout]:
    """Grid layouts from every rank's ``(n1, n2)`` per tensor (the last ``2 * len(names)`` ints of each row).

    Every rank of a mesh row must hold the same length along dim1, every rank of a
    mesh column the same along dim2; otherwise all ranks raise the same error.
    """
    rows, cols = mesh_shape
    width = 2 * len(names)
    sizes = torch.tensor([list(r[len(r) - width :]) for r in table], dtype=torch.int64)
    grid = sizes.view(rows, cols, len(names), 2)
    out = []
    for t, name in enumerate(names):
        along1, along2 = grid[:, :, t, 0], grid[:, :, t, 1]
        uneven = [
            f"mesh row {i}: {along1[i].tolist()} along dim1" for i in range(rows) if along1[i].unique().numel() > 1
        ]
        uneven += [
            f"mesh column {j}: {along2[:, j].tolist()} along dim2"
            for j in range(cols)
            if along2[:, j].unique().numel() > 1
        ]
        if uneven:
            raise ValueError(
                f"{name}'s blocks do not form a grid ({'; '.join(uneven)}); shard it with "
                "MultiAxisAttention2D.shard (dim1 split over the mesh rows, dim2 over the mesh columns)"
            )
        out.append(GridLayout.of(tuple(along1[:, 0].tolist()), tuple(along2[0].tolist())))
    return out


def shard_grid(x: torch.Tensor, dim1: int, dim2: int, mesh_shape: tuple[int, int], sp_rank: int) -> torch.Tensor:
    """Rank ``sp_rank``'s block of the full tensor ``x``: dim1 split over mesh rows, dim2 over columns (a view)."""
    rows, cols = mesh_shape
    i, j = divmod(sp_rank, cols)
    return x.tensor_split(rows, dim1)[i].tensor_split(cols, dim2)[j]


def unshard_grid(x: torch.Tensor, dim1: int, dim2: int, mesh_shape: tuple[int, int], ctx: Context) -> torch.Tensor:
    """The full tensor from every rank's block (collective over the sp group; not differentiable)."""
    if ctx.sp_size == 1:
        return x
    (layout,) = grid_layouts(ctx, mesh_shape, {"x": (x.shape[dim1], x.shape[dim2])})
    row_group, col_group = mesh_groups(ctx, mesh_shape)
    with torch.no_grad():
        band = all_gather_uneven(x, list(layout.cols), dim2, row_group)
        return all_gather_uneven(band, list(layout.rows), dim1, col_group)
