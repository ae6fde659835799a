"""nanoTabPFN with its rows sharded over the sp group, through Mosaic's public API.

What changes against the unsharded model (:mod:`nanotabpfn_model`):

- each layer's ``self_attention_between_datapoints`` becomes a
  ``mosaic.MultiheadAttention`` holding the same weights (same parameter
  names, so the model's ``state_dict`` still loads); one call with
  ``kv_len=split`` replaces the two ``nn.MultiheadAttention`` calls (training
  rows -> training rows, test rows -> training rows), since ``kv_len`` keeps
  the global key prefix on every rank;
- the two statistics over rows — the training rows' mean/std of every feature
  and the training labels' mean that pads the test rows — come from
  ``mosaic.sharded`` instead of ``torch.mean``/``torch.std`` on local rows.

The attention between features, the norms, the MLPs, the encoders' and the
decoder's linear layers are the model's own modules, called as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import mosaic
from mosaic import ShardedDim


def shard_datapoint_attention(model: nn.Module, backend: str) -> nn.Module:
    """Replace every layer's ``self_attention_between_datapoints`` with Mosaic's, same weights (in place)."""
    for block in model.transformer_blocks:
        old = block.self_attention_between_datapoints
        new = mosaic.MultiheadAttention(
            old.embed_dim, old.num_heads, batch_first=True, backend=backend,
            device=old.in_proj_weight.device, dtype=old.in_proj_weight.dtype,
        )  # fmt: skip
        new.load_state_dict(old.state_dict())
        block.self_attention_between_datapoints = new
    return model


class ShardedNanoTabPFN(nn.Module):
    """A nanoTabPFN model whose rows are sharded in order over the sp group.

    Args:
        model: a ``NanoTabPFNModel`` (converted in place; keep a copy for an unsharded reference).
        backend: Mosaic strategy for the attention between datapoints (rows).
    """

    def __init__(self, model: nn.Module, backend: str = "allgather"):
        super().__init__()
        self.model = shard_datapoint_attention(model, backend)

    def forward(self, x: torch.Tensor, y_train: torch.Tensor, split: int, rows: ShardedDim) -> torch.Tensor:
        """Logits of this rank's test rows.

        Args:
            x: ``(B, rows.length, F)``: this rank's rows of the table.
            y_train: ``(B, rows.prefix_count(split))``: the labels of this rank's training rows.
            split: the global number of training rows (they come first).
            rows: where this rank's rows sit (``ctx.sharded_dim(total_rows, dim=1)``).
        """
        model = self.model
        local_train = rows.prefix_count(split)
        src = torch.cat([self.encode_features(x, split, rows), self.encode_targets(y_train, x.shape[1], rows)], 2)
        for block in model.transformer_blocks:
            src = self.layer(block, src, split)
        # This rank's training rows are a prefix of its rows: the rest are its test rows.
        return model.decoder(src[:, local_train:, -1, :])

    def encode_features(self, x: torch.Tensor, split: int, rows: ShardedDim) -> torch.Tensor:
        """``feature_encoder``: normalise with the global training rows' statistics, then its linear layer."""
        x = x.unsqueeze(-1)
        train = rows.prefix_mask(split, x.device).view(1, -1, 1, 1)
        mean = mosaic.sharded.mean(x, 1, mask=train, keepdim=True, over=rows)
        std = mosaic.sharded.std(x, 1, mask=train, unbiased=False, keepdim=True, over=rows) + 1e-5
        std = torch.where(std < 1e-5, torch.ones_like(std), std)
        return self.model.feature_encoder.linear_layer(torch.clip((x - mean) / std, min=-100, max=100))

    def encode_targets(self, y_train: torch.Tensor, local_rows: int, rows: ShardedDim) -> torch.Tensor:
        """``target_encoder``: pad this rank's test rows with the mean of every rank's training labels."""
        y_train = y_train.unsqueeze(-1).to(self.model.target_encoder.linear_layer.weight.dtype)
        mean = mosaic.sharded.mean(y_train, 1, keepdim=True, over=rows)
        padding = mean.expand(-1, local_rows - y_train.shape[1], -1)
        return self.model.target_encoder.linear_layer(torch.cat([y_train, padding], dim=1).unsqueeze(-1))

    @staticmethod
    def layer(block: nn.Module, src: torch.Tensor, split: int) -> torch.Tensor:
        """``TransformerEncoderLayer.forward`` on this rank's rows; ``split`` is global."""
        b, r, c, e = src.shape
        src = src.reshape(b * r, c, e)
        # Every rank holds whole rows, so the attention between features stays the model's own module.
        src = block.self_attention_between_features(src, src, src)[0] + src
        src = block.norm1(src.reshape(b, r, c, e))
        src = src.transpose(1, 2).reshape(b * c, r, e)
        # Every row's query attends to the training rows [0, split) of every rank.
        src = block.self_attention_between_datapoints(src, src, src, need_weights=False, kv_len=split)[0] + src
        src = block.norm2(src.reshape(b, c, r, e).transpose(2, 1))
        src = block.linear2(F.gelu(block.linear1(src))) + src
        return block.norm3(src)
