"""``MultiAxisAttention2D``: attention over the joint sequence of two dims, sharded on a 2-D mesh.

The tensor is sharded over ``axis1`` along mesh axis 0 (rows) and over
``axis2`` along mesh axis 1 (columns): rank ``(i, j)`` holds one block, as
:meth:`MultiAxisAttention2D.shard` cuts it. Every position of the joint
sequence ``axis1 x axis2`` attends to every other, numbered row-major
(``a1 * N2 + a2``). The block rows of mesh row ``i`` together are one run of
the joint sequence, and the ``mesh2d`` tile exchange gathers queries exactly
along those rows and keys along the mesh columns, so it serves this layout
with no re-sharding.
"""

from __future__ import annotations

import math

import torch

from mosaic.sdk import LayoutRule, MultiAxisAttention, attend, get_context, kv_len_int, site_id

from .grid import check_mesh_shape, layouts_from_rows, shard_grid, unshard_grid

__all__ = ["MultiAxisAttention2D"]


def grid_declaration(mesh_shape: tuple[int, int], which: int) -> str:
    """What :meth:`MultiAxisAttention2D.shard` records for dim ``which`` (1 or 2) of the grid."""
    return f"grid {mesh_shape[0]}x{mesh_shape[1]} mesh axis {which - 1}"


class MultiAxisAttention2D(MultiAxisAttention):
    """Multi-head attention over ``axis1 x axis2`` of a ``(..., embed_dim)`` tensor, on a 2-D mesh.

    Args:
        embed_dim: size of the last dim.
        num_heads: query heads; must divide ``embed_dim``.
        axis1: tensor dim sharded over the mesh rows; the major index of the joint sequence.
        axis2: tensor dim sharded over the mesh columns; the minor index.
        mesh_shape: ``(R, C)`` with ``R * C`` = the sp group size.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        bias: biases in the projections.

    Parameters and their names are those of :class:`mosaic.MultiAxisAttention`
    (so of ``nn.MultiheadAttention`` without ``num_kv_heads``): a checkpoint of
    either loads. Communication per rank is that of the ``mesh2d`` backend
    (``mosaic_mesh2d.mesh2d``) with ``n`` = the positions of one block.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        axis1: int,
        axis2: int,
        mesh_shape: tuple[int, int],
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        mesh_shape = check_mesh_shape(tuple(mesh_shape))
        if axis1 == axis2:
            raise ValueError(f"axis1 and axis2 must be different dims, both are {axis1}")
        super().__init__(
            embed_dim,
            num_heads,
            axis1,
            "mesh2d",
            mesh_shape,
            num_kv_heads=num_kv_heads,
            bias=bias,
            sharded=True,
            device=device,
            dtype=dtype,
        )
        self.axis1, self.axis2 = axis1, axis2

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"axis1={self.axis1}, axis2={self.axis2}, mesh_shape={self.mesh_shape}"
        )

    def _joint_dims(self, x: torch.Tensor, name: str = "x") -> tuple[int, int]:
        if x.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., axis1, axis2, embed), got {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"{name} has embed size {x.shape[-1]} (last dim), the module expects {self.embed_dim}")
        dims = []
        for axis in (self.axis1, self.axis2):
            if not -x.dim() <= axis < x.dim() or axis % x.dim() == x.dim() - 1:
                raise ValueError(f"axis {axis} is not a token dim of a {x.dim()}-D {name} (the last dim is embed)")
            dims.append(axis % x.dim())
        if dims[0] == dims[1]:
            raise ValueError(f"axis1={self.axis1} and axis2={self.axis2} are the same dim of a {x.dim()}-D {name}")
        return dims[0], dims[1]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's block of the full tensor ``x`` (a view): axis1 over mesh rows, axis2 over columns.

        Records that both dims are sharded as this grid (the module checks it on every call).
        """
        d1, d2 = self._joint_dims(x)
        ctx = get_context()
        for d, side in ((d1, 1), (d2, 2)):
            ctx.declarations.declare_grid(d, grid_declaration(self.mesh_shape, side))
        return shard_grid(x, d1, d2, self.mesh_shape, ctx.sp_rank)

    def unshard(self, x: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's block (collective over the sp group; not differentiable)."""
        d1, d2 = self._joint_dims(x)
        return unshard_grid(x, d1, d2, self.mesh_shape, get_context())

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, *, kv_len: int | None = None, causal: bool = False
    ) -> torch.Tensor:
        """Attention over the joint sequence ``axis1 x axis2``; returns a tensor shaped like ``x``.

        Args:
            x: this rank's block (:meth:`shard`), ``(..., embed_dim)``.
            kv: block of the source of keys/values for cross-attention; same shape as ``x``
                except along ``axis1`` and ``axis2``.
            kv_len: only the first ``kv_len`` positions of the joint key sequence, in row-major
                order (``a1 * N2 + a2 < kv_len``), are keys; ``kv_len = k * N2`` keeps the
                first ``k`` positions along ``axis1``. In ``[1, N1 * N2]``.
            causal: not supported (the ``mesh2d`` backend says why).

        Every rank's input is checked with the others' in one agreement: a bad input on one
        rank, blocks that do not form a grid, or dims not sharded as this grid (:meth:`shard`)
        raise the same error on every rank.
        """
        ctx = get_context()
        try:
            d1, d2 = self._joint_dims(x)
            self.check_dtype(x)
            if kv is not None:
                kv_dims = self._joint_dims(kv, "kv")
                self.check_dtype(kv, "kv")
                others = [(a, b) for i, (a, b) in enumerate(zip(x.shape, kv.shape, strict=False)) if i not in (d1, d2)]
                if kv_dims != (d1, d2) or kv.dim() != x.dim() or any(a != b for a, b in others):
                    shapes = f"kv shape {tuple(kv.shape)} must equal x shape {tuple(x.shape)}"
                    raise ValueError(f"{shapes} except along dims {d1} and {d2}")
            kv_len = kv_len_int(kv_len)
            xq, batch_shape, block = _fold_joint(x, d1, d2)
            xkv, kv_block = None, block
            if kv is not None:
                xkv, _, kv_block = _fold_joint(kv, d1, d2)
            q, k, v = self._project(xq, xkv)
            declared = [site_id(ctx.declarations.grids.get(d, "none")) for d in (d1, d2)]
        except (TypeError, ValueError) as exc:
            return attend(None, None, None, self._call(None, causal, ()), error=exc)
        expected = [site_id(grid_declaration(self.mesh_shape, i)) for i in (1, 2)]

        def layouts(rows):
            # On one rank every tensor is its own (1, 1) grid: nothing needs declaring there.
            if ctx.sp_size > 1 and any(list(r[-6:-4]) != expected for r in rows):
                raise ValueError(
                    f"{self.description}: dims {d1} and {d2} are not sharded as a {self.mesh_shape} grid on every "
                    "rank; shard the tensor with MultiAxisAttention2D.shard (dim1 over the mesh rows, dim2 over "
                    "the columns)"
                )
            return layouts_from_rows(rows, self.mesh_shape, ["x", "kv"])

        call = self._call(kv_len, causal, tuple(batch_shape))
        out = attend(q, k, v, call, rule=LayoutRule(facts=[*declared, *block, *kv_block], agreed=layouts))
        out = out.transpose(1, 2).reshape(xq.shape[0], xq.shape[1], self.embed_dim)
        return _unfold_joint(self.out_proj(out), batch_shape, block, d1, d2)

    @property
    def description(self) -> str:
        return f"MultiAxisAttention2D(axis1={self.attention_axis}, mesh_shape={self.mesh_shape})"


def _fold_joint(x: torch.Tensor, d1: int, d2: int) -> tuple[torch.Tensor, torch.Size, tuple[int, int]]:
    """``(batch', n1 * n2, embed)`` with the joint dims flattened row-major, the batch shape and ``(n1, n2)``."""
    moved = x.movedim((d1, d2), (-3, -2))
    batch_shape, n1, n2 = moved.shape[:-3], moved.shape[-3], moved.shape[-2]
    # An explicit batch size: a rank's block may be empty, and -1 can't be inferred from 0 elements.
    return moved.reshape(math.prod(batch_shape), n1 * n2, moved.shape[-1]), batch_shape, (n1, n2)


def _unfold_joint(y: torch.Tensor, batch_shape: torch.Size, block: tuple[int, int], d1: int, d2: int) -> torch.Tensor:
    return y.reshape(*batch_shape, *block, y.shape[-1]).movedim((-3, -2), (d1, d2))
