"""nanoTabPFN with its rows sharded over the sp group.

The structure and parameter names are those of the public nanoTabPFN
(``feature_encoder``, ``target_encoder``, ``transformer_blocks``, ``decoder``;
each block's attentions are ``nn.MultiheadAttention``-compatible), so its
checkpoints load. The differences are what sharding the rows needs:

- the train-row statistics (feature mean/std, target mean) are taken over the
  rows of every rank with ``mosaic.sharded`` (torch's ``mean``/``std`` on the
  unsharded rows, differentiable), so the model runs no collective of its own;
- row attention is ``mosaic.MultiAxisAttention`` over dim 1 with
  ``kv_len = train_size``: every row attends to the training rows only, which
  is the original's two calls (train to train, test to train) in one;
- the decoder runs on every local row, and the caller masks the loss to the
  test rows (see ``objective.py`` for why).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mosaic
from mosaic import ShardedDim

# nanoTabPFN's bounds: std gets 1e-20 so constant features do not divide by zero,
# normalised values are clipped so outliers stay in the encoder's range.
STD_EPS = 1e-20
CLIP = 100.0


class FeatureEncoder(nn.Module):
    """Each cell to an embedding, after normalising by the training rows' mean and std."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.linear_layer = nn.Linear(1, embedding_size)

    def forward(self, x: torch.Tensor, is_train: torch.Tensor, rows: ShardedDim) -> torch.Tensor:
        """``(B, R, F)`` features to ``(B, R, F, E)``; statistics over the global training rows."""
        train = is_train.view(1, -1, 1)
        mean = mosaic.sharded.mean(x, 1, mask=train, keepdim=True, over=rows)
        std = mosaic.sharded.std(x, 1, mask=train, keepdim=True, over=rows) + STD_EPS
        x = ((x - mean) / std).clip(-CLIP, CLIP)
        return self.linear_layer(x.unsqueeze(-1))


class TargetEncoder(nn.Module):
    """The target column: training labels, test rows padded with the training mean."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.linear_layer = nn.Linear(1, embedding_size)

    def forward(self, y: torch.Tensor, is_train: torch.Tensor, rows: ShardedDim) -> torch.Tensor:
        """``(B, R)`` labels to ``(B, R, 1, E)``; test rows' labels are never read."""
        y = y.to(torch.float32)
        mean = mosaic.sharded.mean(y, 1, mask=is_train.view(1, -1), keepdim=True, over=rows)
        y = torch.where(is_train, y, mean)
        return self.linear_layer(y.view(*y.shape, 1, 1))


class TransformerEncoderLayer(nn.Module):
    """Post-norm block: attention between features, between rows (to train rows), MLP."""

    def __init__(
        self,
        embedding_size: int,
        nhead: int,
        mlp_hidden_size: int,
        backend: str,
        layer_norm_eps: float,
        backend_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        # Features of one row are few and whole on every rank: local attention over dim 2.
        self.self_attention_between_features = mosaic.MultiAxisAttention(embedding_size, nhead, 2, "local")
        # Rows are sharded: the sequence-parallel backend over dim 1.
        self.self_attention_between_datapoints = mosaic.MultiAxisAttention(
            embedding_size, nhead, 1, backend, backend_options=backend_options
        )
        self.linear1 = nn.Linear(embedding_size, mlp_hidden_size)
        self.linear2 = nn.Linear(mlp_hidden_size, embedding_size)
        self.norm1 = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(embedding_size, eps=layer_norm_eps)

    def forward(self, src: torch.Tensor, train_size: int, chunk_rows: int | None = None) -> torch.Tensor:
        """``(B, R, C, E)`` to the same shape.

        With ``chunk_rows`` and no gradients (inference), the block runs in place on ``src``:
        feature attention and ``norm1`` on ``chunk_rows`` rows at a time, then the rest one
        column at a time (a column's row attention needs only that column, and ``norm2``,
        the MLP and ``norm3`` act on each cell): the working memory is a chunk's or a
        column's beside ``src``, not the block's activations.
        """
        if chunk_rows is None or torch.is_grad_enabled():
            src = self.norm1(self.self_attention_between_features(src) + src)
            src = self.norm2(self.self_attention_between_datapoints(src, kv_len=train_size) + src)
            return self.norm3(self.linear2(F.gelu(self.linear1(src))) + src)
        # The stream as the unchunked block keeps it (LayerNorm under autocast returns fp32).
        src = src.to(torch.promote_types(src.dtype, self.norm1.weight.dtype))
        for rows in src.split(chunk_rows, dim=1):
            rows.copy_(self.norm1(self.self_attention_between_features(rows) + rows))
        for column in src.split(1, dim=2):
            column.copy_(self.norm2(self.self_attention_between_datapoints(column, kv_len=train_size) + column))
            column.copy_(self.norm3(self.linear2(F.gelu(self.linear1(column))) + column))
        return src


class Decoder(nn.Module):
    """Target-column embedding to class logits."""

    def __init__(self, embedding_size: int, mlp_hidden_size: int, num_outputs: int):
        super().__init__()
        self.linear1 = nn.Linear(embedding_size, mlp_hidden_size)
        self.linear2 = nn.Linear(mlp_hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class NanoTabPFN(nn.Module):
    """nanoTabPFN: in-context classification of the test rows of a table from its training rows.

    Args:
        embedding_size: E, the width of every cell's embedding.
        num_attention_heads: heads of both attentions.
        mlp_hidden_size: hidden width of the MLPs (blocks and decoder).
        num_layers: transformer blocks.
        num_outputs: classes the decoder scores.
        backend: Mosaic strategy for row attention (``"local"`` when the rows are whole).
        backend_options: its options (``mosaic.get_backend(backend).Options``), e.g.
            ``{"mesh_shape": (2, 2)}`` for ``mesh2d``.
        checkpoint_layers: recompute each block in the backward instead of keeping its
            activations (memory for 10^6 rows, about a third more compute).
        inference_rows: without gradients, run each block's feature attention on this many
            rows at a time and the rest a column at a time, in place: inference on 10^6 rows
            in a few GiB. ``None``: all at once.
        layer_norm_eps: LayerNorm epsilon (nanoTabPFN's default).
    """

    def __init__(
        self,
        embedding_size: int = 96,
        num_attention_heads: int = 4,
        mlp_hidden_size: int = 192,
        num_layers: int = 3,
        num_outputs: int = 2,
        backend: str = "local",
        *,
        backend_options: Mapping[str, Any] | None = None,
        checkpoint_layers: bool = False,
        inference_rows: int | None = None,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.num_outputs = num_outputs
        self.checkpoint_layers = checkpoint_layers
        self.inference_rows = inference_rows
        self.feature_encoder = FeatureEncoder(embedding_size)
        self.target_encoder = TargetEncoder(embedding_size)
        self.transformer_blocks = nn.ModuleList(
            TransformerEncoderLayer(
                embedding_size, num_attention_heads, mlp_hidden_size, backend, layer_norm_eps, backend_options
            )
            for _ in range(num_layers)
        )
        self.decoder = Decoder(embedding_size, mlp_hidden_size, num_outputs)

    def set_row_backend(self, name: str, **options: Any) -> None:
        """Switch every block's row attention to another strategy and its options (the weights stay)."""
        for block in self.transformer_blocks:
            block.self_attention_between_datapoints.set_backend(name, **options)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, train_size: int, rows: ShardedDim | None = None
    ) -> torch.Tensor:
        """Class logits for every local row.

        Args:
            x: ``(B, R, F)`` features of this rank's rows.
            y: ``(B, R)`` class labels of the same rows; only training rows' labels are read.
            train_size: global rows ``[0, train_size)`` are training rows, the rest test rows.
            rows: where the local rows sit (``ctx.sharded_dim(total, dim=1)``; default: all rows are local).

        Returns:
            ``(B, R, num_outputs)``; the test rows' logits are the predictions.
        """
        if x.dim() != 3 or y.shape != x.shape[:2]:
            raise ValueError(f"x must be (B, R, F) and y (B, R); got {tuple(x.shape)} and {tuple(y.shape)}")
        rows = rows or ShardedDim.whole(x.shape[1])
        if x.shape[1] != rows.length:
            raise ValueError(f"x holds {x.shape[1]} rows but this rank's shard has {rows.length}")
        if not 2 <= train_size < rows.total:
            raise ValueError(f"train_size {train_size} must be in [2, {rows.total}) for {rows.total} rows")
        is_train = rows.prefix_mask(train_size, x.device)
        src = torch.cat([self.feature_encoder(x, is_train, rows), self.target_encoder(y, is_train, rows)], dim=2)
        for block in self.transformer_blocks:
            if self.checkpoint_layers and torch.is_grad_enabled():
                src = checkpoint(block, src, train_size, use_reentrant=False)
            else:
                src = block(src, train_size, self.inference_rows)
        return self.decoder(src[:, :, -1])
