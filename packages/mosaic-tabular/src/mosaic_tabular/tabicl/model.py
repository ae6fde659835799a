"""TabICL's model (tabicl 2.2) on rows sharded over the sp group: :func:`shard_tabicl`.

The model keeps its modules and weights; what changes is where it computes over rows:

- the ICL transformer's attention and the column embedder's inducing points
  attend over every rank's rows (:mod:`.attention`), with the global key count
  for the scalable softmax;
- the induced blocks' skip decision and the number of classes (the column
  embedder's ``y_train.max()``, the predictor's ``torch.unique``) are taken over
  every rank's rows (:mod:`.embedding`, :mod:`.learning`);
- the inference managers of the column embedder and the ICL predictor size
  their batches to this rank's free memory; the sharded attention inside needs
  the same batches on every rank, so the ranks take the smallest (:mod:`.inference`).

The row interaction (attention between the features of one row) and the induced
blocks' attention from rows to the inducing points' result run as they are
(:mod:`.interaction`, :class:`.attention.RowLocalMultiheadAttention`: also on a rank without rows).
``forward``, ``predict_stats`` (regression) and the K/V-cache methods
``forward_with_cache`` / ``predict_stats_with_cache`` take this rank's rows and
its training rows' labels, or with ``whole_table=True`` the whole table on every
rank, gathering the test rows' outputs. A cache built on sharded rows holds, on
each rank, the keys/values of that rank's training rows (and, whole, those of the
inducing points' result); its test rows attend to every rank's cached rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from tabicl._model.inference_config import InferenceConfig
from tabicl._model.kv_cache import TabICLCache
from tabicl._model.layers import InducedSelfAttentionBlock, MultiheadAttention
from tabicl._model.tabicl import TabICL

import mosaic

from ..rows import RowSplit
from ..upstream import check_upstream
from .attention import RowLocalMultiheadAttention, RowShardedInducedSelfAttentionBlock, RowShardedMultiheadAttention
from .classes import distinct_classes
from .embedding import RowShardedColEmbedding
from .inference import AgreedInferenceManager
from .interaction import RowShardedRowInteraction
from .learning import RowShardedICLearning, classes_of_the_cache_being_built

__all__ = ["RowShardedTabICL", "shard_tabicl"]


class RowShardedTabICL(TabICL):
    """tabicl's ``TabICL`` on rows sharded over the sp group (made by :func:`shard_tabicl`)."""

    mosaic_whole_table: bool = False

    def forward(self, X: torch.Tensor, y_train: torch.Tensor, d: torch.Tensor | None = None,
                embed_with_test: bool = False, feature_shuffles: list[list[int]] | None = None,
                return_logits: bool = True, softmax_temperature: float = 0.9,
                inference_config: InferenceConfig | None = None) -> torch.Tensor:  # fmt: skip
        self._refuse_training()
        return super().forward(X, y_train, d, embed_with_test, feature_shuffles, return_logits, softmax_temperature,
                               inference_config)  # fmt: skip

    def _inference_forward(self, X: torch.Tensor, y_train: torch.Tensor,
                           feature_shuffles: list[list[int]] | None = None, embed_with_test: bool = False,
                           return_logits: bool = True, softmax_temperature: float = 0.9,
                           inference_config: InferenceConfig | None = None) -> torch.Tensor:  # fmt: skip
        """TabICL's inference on this rank's rows, or (``mosaic_whole_table``) on the whole table.

        ``forward`` and ``predict_stats`` both come here.
        """
        self._refuse_training()
        kwargs = dict(feature_shuffles=feature_shuffles, embed_with_test=embed_with_test, return_logits=return_logits,
                      softmax_temperature=softmax_temperature, inference_config=inference_config)  # fmt: skip
        if not self.mosaic_whole_table:
            return super()._inference_forward(X, y_train, **kwargs)
        rows = RowSplit.of(X.shape[1], y_train.shape[1])
        out = super()._inference_forward(rows.take(X, 1), rows.take_train(y_train, 1), **kwargs)
        return mosaic.get_context().unshard(out, 1)

    def forward_with_cache(self, X_train: torch.Tensor | None = None, y_train: torch.Tensor | None = None,
                           X_test: torch.Tensor | None = None, return_logits: bool = True,
                           softmax_temperature: float = 0.9, use_cache: bool = False, store_cache: bool = True,
                           cache: TabICLCache | None = None, cache_mode: str = "kv",
                           inference_config: InferenceConfig | None = None) -> torch.Tensor | None:  # fmt: skip
        """The package's K/V-cache forward (build with ``store_cache``, predict with ``use_cache`` or ``cache``).

        On this rank's training and test rows, or (``mosaic_whole_table``) on the whole
        ``X_train``/``y_train``/``X_test``: the training rows and the test rows are each
        split over the ranks (a rank may hold none), the test rows' outputs gathered.
        A cache is this rank's: use it on the sp group that built it.
        """
        self._refuse_training()
        if self.mosaic_whole_table:
            X_train, y_train, X_test = _this_ranks_rows(X_train, y_train, X_test)
        building = cache is None and store_cache and not use_cache and y_train is not None
        # The package's cache records the classes of the labels this rank holds: every rank's instead.
        classes = distinct_classes(y_train[0]) if building and self.max_classes > 0 else None
        with contextlib.nullcontext() if classes is None else classes_of_the_cache_being_built(classes):
            out = super().forward_with_cache(X_train, y_train, X_test, return_logits, softmax_temperature, use_cache,
                                             store_cache, cache, cache_mode, inference_config)  # fmt: skip
        if classes is not None:
            self._cache.num_classes = classes
        if out is None or not self.mosaic_whole_table:
            return out
        return mosaic.get_context().unshard(out, 1)

    def _refuse_training(self) -> None:
        # Decided by the module's mode, the same on every rank.
        if self.training:
            raise NotImplementedError("mosaic-tabular shards TabICL's inference only: call model.eval() first")


def _this_ranks_rows(X_train: torch.Tensor | None, y_train: torch.Tensor | None, X_test: torch.Tensor | None):
    """This rank's share of the training rows (and labels) and, split apart, of the test rows (dim 1)."""
    if X_train is not None or y_train is not None:
        n = (y_train if y_train is not None else X_train).shape[1]
        train = RowSplit.of(n, n)
        X_train = None if X_train is None else train.take(X_train, 1)
        y_train = None if y_train is None else train.take(y_train, 1)
    if X_test is not None:
        X_test = RowSplit.of(X_test.shape[1], 0).take(X_test, 1)
    return X_train, y_train, X_test


def shard_tabicl(model: TabICL, backend: str = "auto", *, whole_table: bool = False) -> TabICL:
    """Make tabicl's ``TabICL`` run on rows sharded over the sp group, in place (same modules and weights).

    Args:
        model: a ``tabicl._model.tabicl.TabICL`` (an estimator's ``model_``), classifier or regressor.
        backend: the Mosaic strategy over rows (``mosaic.available_backends()``; ``"auto"`` picks one per call).
        whole_table: the forwards take the whole table on every rank and return every test row's
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
    model.row_interactor.__class__ = RowShardedRowInteraction
    for manager in (model.col_embedder.inference_mgr, model.icl_predictor.inference_mgr):
        manager.__class__ = AgreedInferenceManager
    for block in model.col_embedder.tf_col.modules():
        if isinstance(block, InducedSelfAttentionBlock):
            block.__class__ = RowShardedInducedSelfAttentionBlock
            _shard_attention(block.multihead_attn1.attn, backend, "replicated")
            block.multihead_attn2.attn.__class__ = RowLocalMultiheadAttention
    for block in model.icl_predictor.tf_icl.blocks:
        _shard_attention(block.attn, backend, "sharded")
    return model


def _shard_attention(attn: nn.Module, backend: str, queries: str) -> None:
    if not isinstance(attn, MultiheadAttention):
        raise TypeError(f"expected tabicl's MultiheadAttention, got {type(attn).__name__}")
    attn.__class__ = RowShardedMultiheadAttention
    attn.mosaic_backend, attn.mosaic_queries = backend, queries
