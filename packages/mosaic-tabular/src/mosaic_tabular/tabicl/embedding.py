"""TabICL's column embedder on rows sharded over the sp group: the class count of every rank's labels.

The column embedder's inducing points attend over every rank's training rows
(:mod:`.attention`); what else it takes from rows is the number of classes
(``y_train.max() + 1``), which picks the target encoding (mixed radix beyond
``max_classes``) and refuses a K/V cache beyond it. tabicl counts it from the
labels it is given, and a rank without training rows has none, so both methods
that count are overridden to count every rank's labels. The rest is the
package's: ``_compute_embeddings_with_cache`` and the set transformer it runs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from tabicl._model.embedding import ColEmbedding
from tabicl._model.inference_config import InferenceConfig
from tabicl._model.kv_cache import KVCache

from .classes import largest_class_plus_one

__all__ = ["RowShardedColEmbedding"]


class RowShardedColEmbedding(ColEmbedding):
    """tabicl's ``ColEmbedding`` whose target-aware step sees every rank's labels (made by class swap)."""

    def _compute_embeddings(self, features: torch.Tensor, train_size: int, y_train: torch.Tensor | None = None,
                            embed_with_test: bool = False) -> torch.Tensor:  # fmt: skip
        src = self.in_linear(features)
        if self.target_aware:
            if self.max_classes > 0 and largest_class_plus_one(y_train) > self.max_classes:
                raise NotImplementedError(
                    f"mosaic-tabular 0.1 does not shard TabICL's mixed-radix column embedding (more than "
                    f"{self.max_classes} classes)"
                )
            y_emb = self.y_encoder(y_train.float() if self.max_classes > 0 else y_train.unsqueeze(-1))
            src[..., :train_size, :] = src[..., :train_size, :] + y_emb
        src = self.tf_col(src, train_size=None if embed_with_test else train_size)
        if not self.affine:
            return src
        return features * self.ln_w(self.out_w(src)) + self.ln_b(self.out_b(src))

    def forward_with_cache(self, X: torch.Tensor, col_cache: KVCache, y_train: torch.Tensor | None = None,
                           use_cache: bool = False, store_cache: bool = True,
                           mgr_config: dict | None = None) -> torch.Tensor:  # fmt: skip
        """The package's cached column embedding (``(B, T, H)`` -> ``(B, T, G+C, E)``), counting every rank's labels.

        When building the cache (``store_cache``), ``X`` is this rank's training rows
        (then its test rows, if any) and ``y_train`` their labels; when using it, ``X``
        is this rank's test rows.
        """
        if use_cache == store_cache:
            raise ValueError("Exactly one of use_cache or store_cache must be True")
        if store_cache:
            if y_train is None:
                raise ValueError("y_train must be provided when store_cache=True")
            if self.target_aware and self.max_classes > 0:
                num_classes = largest_class_plus_one(y_train)
                if num_classes > self.max_classes:
                    raise ValueError(
                        f"KV caching is not supported for classification with more classes ({num_classes}) than "
                        f"max_classes ({self.max_classes}). Mixed-radix ensemble requires multiple forward passes "
                        "which is incompatible with caching."
                    )
        self.inference_mgr.configure(**(InferenceConfig().COL_CONFIG if mgr_config is None else mgr_config))
        features = self._cells(X)
        train_size = y_train.shape[1] if store_cache else None
        y_cells = y_train.unsqueeze(1).expand(-1, features.shape[1], -1) if store_cache else None
        inputs = OrderedDict([("features", features), ("col_cache", col_cache), ("train_size", train_size),
                              ("y_train", y_cells), ("use_cache", use_cache),
                              ("store_cache", store_cache)])  # fmt: skip
        return self.inference_mgr(self._compute_embeddings_with_cache, inputs=inputs).transpose(1, 2)

    def _cells(self, X: torch.Tensor) -> torch.Tensor:
        """The package's layout of the set transformer's input: ``(B, G+C, T, group size)``, class tokens first."""
        if self.feature_group:
            X = self.feature_grouping(X)
            if self.reserve_cls_tokens > 0:
                X = F.pad(X, (0, 0, self.reserve_cls_tokens, 0), value=-100.0)
            return X.transpose(1, 2)
        if self.reserve_cls_tokens > 0:
            X = F.pad(X, (self.reserve_cls_tokens, 0), value=-100.0)
        return X.transpose(1, 2).unsqueeze(-1)
