"""TabICL's model (tabicl 2.2) on rows sharded over the sp group: :func:`shard_tabicl`.

The model keeps its modules and weights; what changes is where it computes over rows:

- the ICL transformer's attention and the column embedder's inducing points
  attend over every rank's rows (:mod:`.attention`), with the global key count
  for the scalable softmax;
- the induced blocks' skip decision, the number of classes (the column
  embedder's ``y_train.max()``, the predictor's ``torch.unique``) are taken
  over every rank's rows;
- the inference managers of the column embedder and the ICL predictor size
  their batches to this rank's free memory; the sharded attention inside needs
  the same batches on every rank, so the ranks take the smallest.

The row interaction (attention between the features of one row) runs as it is.
``forward`` (inference) takes this rank's rows (``X`` ``(B, T_local, H)``) and its
training rows' labels, or with ``whole_table=True`` the whole table on every
rank, gathering the test rows' outputs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from tabicl._model.embedding import ColEmbedding
from tabicl._model.inference import InferenceManager
from tabicl._model.inference_config import InferenceConfig
from tabicl._model.layers import InducedSelfAttentionBlock, MultiheadAttention
from tabicl._model.learning import ICLearning
from tabicl._model.tabicl import TabICL

import mosaic

from ..rows import RowSplit
from ..upstream import check_upstream
from .attention import RowShardedInducedSelfAttentionBlock, RowShardedMultiheadAttention

__all__ = ["RowShardedTabICL", "shard_tabicl"]


def _num_classes(y_train: torch.Tensor) -> int:
    """The number of classes of every rank's training labels (the largest label + 1)."""
    local = int(y_train.max().item()) + 1 if y_train.numel() else 0
    return mosaic.sharded.agree(local, "max")


class RowShardedColEmbedding(ColEmbedding):
    """tabicl's ``ColEmbedding`` whose target-aware step sees every rank's labels (made by class swap)."""

    def _compute_embeddings(self, features: torch.Tensor, train_size: int, y_train: torch.Tensor | None = None,
                            embed_with_test: bool = False) -> torch.Tensor:  # fmt: skip
        src = self.in_linear(features)
        if self.target_aware:
            if self.max_classes > 0 and _num_classes(y_train) > self.max_classes:
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

    def forward_with_cache(self, *args, **kwargs):
        raise NotImplementedError("mosaic-tabular 0.1 does not shard TabICL's column-embedding cache")


class RowShardedICLearning(ICLearning):
    """tabicl's ``ICLearning`` whose class count comes from every rank's labels (made by class swap)."""

    def _inference_forward(self, R: torch.Tensor, y_train: torch.Tensor, return_logits: bool = True,
                           softmax_temperature: float = 0.9, mgr_config=None) -> torch.Tensor:  # fmt: skip
        self.inference_mgr.configure(**(InferenceConfig().ICL_CONFIG if mgr_config is None else mgr_config))
        train_size = y_train.shape[1]
        if self.max_classes > 0:
            counts = {len(mosaic.sharded.unique(y)) for y in y_train}
            if len(counts) != 1:
                raise ValueError("All tables must have the same number of classes")
            num_classes = counts.pop()
            if num_classes > self.max_classes:
                raise NotImplementedError(
                    f"mosaic-tabular 0.1 does not shard TabICL's hierarchical classification (more than "
                    f"{self.max_classes} classes)"
                )
        inputs = OrderedDict([("R", R), ("y_train", y_train)])
        out = self.inference_mgr(self._icl_predictions, inputs=inputs)[:, train_size:]
        if self.max_classes == 0:
            return out
        out = out[..., :num_classes]
        return out if return_logits else torch.softmax(out / softmax_temperature, dim=-1)

    def forward_with_cache(self, *args, **kwargs):
        raise NotImplementedError("mosaic-tabular 0.1 does not shard TabICL's ICL cache")


class AgreedInferenceManager(InferenceManager):
    """tabicl's ``InferenceManager`` whose batch size is the smallest any rank estimates (made by class swap)."""

    def estimate_safe_batch_size(self, seq_len: int, include_inputs: bool = True, in_dim: int | None = None,
                                 max_bs: int = 50000) -> tuple[float, int]:  # fmt: skip
        memory, batch = super().estimate_safe_batch_size(seq_len, include_inputs, in_dim, max_bs)
        return memory, mosaic.sharded.agree(batch, "min")


class RowShardedTabICL(TabICL):
    """tabicl's ``TabICL`` on rows sharded over the sp group (made by :func:`shard_tabicl`)."""

    mosaic_whole_table: bool = False

    def forward(self, X: torch.Tensor, y_train: torch.Tensor, d: torch.Tensor | None = None,
                embed_with_test: bool = False, feature_shuffles: list[list[int]] | None = None,
                return_logits: bool = True, softmax_temperature: float = 0.9,
                inference_config: InferenceConfig | None = None) -> torch.Tensor:  # fmt: skip
        """TabICL's inference forward on this rank's rows, or (``mosaic_whole_table``) on the whole table."""
        if self.training:
            raise NotImplementedError("mosaic-tabular 0.1 shards TabICL's inference forward only (call .eval())")
        kwargs = dict(feature_shuffles=feature_shuffles, embed_with_test=embed_with_test, return_logits=return_logits,
                      softmax_temperature=softmax_temperature, inference_config=inference_config)  # fmt: skip
        if not self.mosaic_whole_table:
            return self._inference_forward(X, y_train, **kwargs)
        rows = RowSplit.of(X.shape[1], y_train.shape[1])
        out = self._inference_forward(rows.take(X, 1), rows.take_train(y_train, 1), **kwargs)
        return mosaic.get_context().unshard(out, 1)

    def forward_with_cache(self, *args, **kwargs):
        raise NotImplementedError("mosaic-tabular 0.1 does not shard TabICL's K/V caches (kv_cache=False)")


def shard_tabicl(model: TabICL, backend: str = "auto", *, whole_table: bool = False) -> TabICL:
    """Make tabicl's ``TabICL`` run on rows sharded over the sp group, in place (same modules and weights).

    Args:
        model: a ``tabicl._model.tabicl.TabICL`` (an estimator's ``model_``).
        backend: the Mosaic strategy over rows (``mosaic.available_backends()``; ``"auto"`` picks one per call).
        whole_table: ``forward`` takes the whole table on every rank and returns every test row's
            output; otherwise this rank's rows, and its test rows' outputs.
    """
    check_upstream("tabicl")
    mosaic.get_backend(backend)
    mosaic.get_context()
    if not isinstance(model, TabICL):
        raise TypeError(f"shard_tabicl takes tabicl's TabICL model, got {type(model).__name__}")
    model.__class__ = RowShardedTabICL
    model.mosaic_whole_table = whole_table
    model.col_embedder.__class__ = RowShardedColEmbedding
    model.icl_predictor.__class__ = RowShardedICLearning
    for manager in (model.col_embedder.inference_mgr, model.icl_predictor.inference_mgr):
        manager.__class__ = AgreedInferenceManager
    for block in model.col_embedder.tf_col.modules():
        if isinstance(block, InducedSelfAttentionBlock):
            block.__class__ = RowShardedInducedSelfAttentionBlock
            _shard_attention(block.multihead_attn1.attn, backend, "replicated")
    for block in model.icl_predictor.tf_icl.blocks:
        _shard_attention(block.attn, backend, "sharded")
    return model


def _shard_attention(attn: nn.Module, backend: str, queries: str) -> None:
    if not isinstance(attn, MultiheadAttention):
        raise TypeError(f"expected tabicl's MultiheadAttention, got {type(attn).__name__}")
    attn.__class__ = RowShardedMultiheadAttention
    attn.mosaic_backend, attn.mosaic_queries = backend, queries
