"""nanoTabPFN as the public automl/nanoTabPFN ``model.py`` builds it, unsharded.

nanoTabPFN is not a package on an index, so this file is the model under test:
the same modules, parameter names and arithmetic as its ``NanoTabPFNModel``
(``feature_encoder.linear_layer``, ``target_encoder.linear_layer``,
``transformer_blocks.N.{self_attention_between_features,
self_attention_between_datapoints, linear1, linear2, norm1..3}``,
``decoder.linear1/2``), with ``nn.MultiheadAttention`` (batch first) for both
attentions. :mod:`nanotabpfn_adapter` shards its rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureEncoder(nn.Module):
    """Each cell -> ``Linear(1, E)`` after normalising with the training rows' mean and std."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.linear_layer = nn.Linear(1, embedding_size)

    def forward(self, x: torch.Tensor, train_test_split_index: int) -> torch.Tensor:
        x = x.unsqueeze(-1)
        train = x[:, :train_test_split_index]
        mean = torch.mean(train, dim=1, keepdim=True)
        std = torch.std(train, dim=1, keepdim=True, unbiased=False) + 1e-5
        std = torch.where(std < 1e-5, torch.ones_like(std), std)
        return self.linear_layer(torch.clip((x - mean) / std, min=-100, max=100))


class TargetEncoder(nn.Module):
    """The training labels, padded to every row with their mean, -> ``Linear(1, E)``."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.linear_layer = nn.Linear(1, embedding_size)

    def forward(self, y_train: torch.Tensor, num_rows: int) -> torch.Tensor:
        mean = torch.mean(y_train, dim=1, keepdim=True)
        padding = mean.repeat(1, num_rows - y_train.shape[1], 1)
        return self.linear_layer(torch.cat([y_train, padding], dim=1).unsqueeze(-1))


class TransformerEncoderLayer(nn.Module):
    """Attention between features, then between datapoints (test rows see training rows only), then an MLP."""

    def __init__(self, embedding_size: int, nhead: int, mlp_hidden_size: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        e = embedding_size
        self.self_attention_between_datapoints = nn.MultiheadAttention(e, nhead, batch_first=True)
        self.self_attention_between_features = nn.MultiheadAttention(e, nhead, batch_first=True)
        self.linear1 = nn.Linear(e, mlp_hidden_size)
        self.linear2 = nn.Linear(mlp_hidden_size, e)
        self.norm1 = nn.LayerNorm(e, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(e, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(e, eps=layer_norm_eps)

    def forward(self, src: torch.Tensor, train_test_split_index: int) -> torch.Tensor:
        b, r, c, e = src.shape
        split = train_test_split_index
        src = src.reshape(b * r, c, e)
        src = self.self_attention_between_features(src, src, src)[0] + src
        src = self.norm1(src.reshape(b, r, c, e))
        src = src.transpose(1, 2).reshape(b * c, r, e)
        train = src[:, :split]
        left = self.self_attention_between_datapoints(train, train, train)[0]
        right = self.self_attention_between_datapoints(src[:, split:], train, train)[0]
        src = torch.cat([left, right], dim=1) + src
        src = self.norm2(src.reshape(b, c, r, e).transpose(2, 1))
        src = self.linear2(F.gelu(self.linear1(src))) + src
        return self.norm3(src)


class Decoder(nn.Module):
    def __init__(self, embedding_size: int, mlp_hidden_size: int, num_outputs: int):
        super().__init__()
        self.linear1 = nn.Linear(embedding_size, mlp_hidden_size)
        self.linear2 = nn.Linear(mlp_hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class NanoTabPFNModel(nn.Module):
    """Logits of the test rows from ``(x (B, R, F), y_train (B, N))`` and the split ``N``."""

    def __init__(self, embedding_size: int, num_attention_heads: int, mlp_hidden_size: int, num_layers: int,
                 num_outputs: int):  # fmt: skip
        super().__init__()
        self.feature_encoder = FeatureEncoder(embedding_size)
        self.target_encoder = TargetEncoder(embedding_size)
        self.transformer_blocks = nn.ModuleList(
            TransformerEncoderLayer(embedding_size, num_attention_heads, mlp_hidden_size) for _ in range(num_layers)
        )
        self.decoder = Decoder(embedding_size, mlp_hidden_size, num_outputs)

    def forward(self, src: tuple[torch.Tensor, torch.Tensor], train_test_split_index: int) -> torch.Tensor:
        x, y_train = src
        if y_train.dim() < x.dim():
            y_train = y_train.unsqueeze(-1)
        x = self.feature_encoder(x, train_test_split_index)
        y = self.target_encoder(y_train, x.shape[1])
        src_ = torch.cat([x, y], 2)
        for block in self.transformer_blocks:
            src_ = block(src_, train_test_split_index=train_test_split_index)
        return self.decoder(src_[:, train_test_split_index:, -1, :])
