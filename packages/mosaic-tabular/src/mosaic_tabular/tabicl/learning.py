"""TabICL's ICL predictor on rows sharded over the sp group: the class count of every rank's labels.

The ICL transformer's attention over rows is sharded in :mod:`.attention`; the
predictor also counts the classes of the training labels (distinct labels of
the first table), which decides the classifier (hierarchical beyond
``max_classes``), how many logits are returned, and what a K/V cache records.
A rank counts only the labels it holds, so each method that counts is
overridden to count every rank's; the model runs through the package's
``_icl_predictions`` / ``_icl_predictions_with_cache``.

:func:`classes_of_the_cache_being_built` hands the count to
``forward_with_repr_cache``, which the package calls while building a
representation cache with the count of the labels this rank holds.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from tabicl._model.inference_config import InferenceConfig
from tabicl._model.kv_cache import KVCache
from tabicl._model.learning import ICLearning

from .classes import distinct_classes

__all__ = ["RowShardedICLearning", "classes_of_the_cache_being_built"]

_CACHE_CLASSES: ContextVar[int | None] = ContextVar("mosaic_tabular_tabicl_cache_classes", default=None)


@contextlib.contextmanager
def classes_of_the_cache_being_built(num_classes: int) -> Iterator[None]:
    """While a cache is built, the class count of every rank's labels (what the package's cache records)."""
    token = _CACHE_CLASSES.set(num_classes)
    try:
        yield
    finally:
        _CACHE_CLASSES.reset(token)


def _classify(out: torch.Tensor, num_classes: int, return_logits: bool, softmax_temperature: float) -> torch.Tensor:
    """The package's last step: the logits of the classes present, or their probabilities."""
    out = out[..., :num_classes]
    return out if return_logits else torch.softmax(out / softmax_temperature, dim=-1)


class RowShardedICLearning(ICLearning):
    """tabicl's ``ICLearning`` whose class count comes from every rank's labels (made by class swap)."""

    def _inference_forward(self, R: torch.Tensor, y_train: torch.Tensor, return_logits: bool = True,
                           softmax_temperature: float = 0.9, mgr_config=None) -> torch.Tensor:  # fmt: skip
        self.inference_mgr.configure(**(InferenceConfig().ICL_CONFIG if mgr_config is None else mgr_config))
        train_size = y_train.shape[1]
        if self.max_classes > 0:
            counts = {distinct_classes(y) for y in y_train}
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
        return _classify(out, num_classes, return_logits, softmax_temperature)

    def forward_with_cache(self, R: torch.Tensor, icl_cache: KVCache, y_train: torch.Tensor | None = None,
                           num_classes: int | None = None, return_logits: bool = True,
                           softmax_temperature: float = 0.9, use_cache: bool = False, store_cache: bool = True,
                           mgr_config=None) -> torch.Tensor:  # fmt: skip
        """The package's K/V-cache predictor: each rank caches its training rows, its test rows attend to all."""
        if use_cache == store_cache:
            raise ValueError("Exactly one of use_cache or store_cache must be True")
        if store_cache:
            if y_train is None:
                raise ValueError("y_train must be provided when store_cache=True")
            if self.max_classes > 0:
                num_classes = distinct_classes(y_train[0])
                if num_classes > self.max_classes:
                    raise ValueError(
                        f"KV caching is not supported for classification with more classes ({num_classes}) than "
                        f"max_classes ({self.max_classes}). Hierarchical classification requires multiple forward "
                        "passes which is incompatible with caching."
                    )
        elif num_classes is None:
            raise ValueError("num_classes must be provided when use_cache=True")
        self.inference_mgr.configure(**(InferenceConfig().ICL_CONFIG if mgr_config is None else mgr_config))
        inputs = OrderedDict([("R", R), ("icl_cache", icl_cache), ("y_train", y_train), ("use_cache", use_cache),
                              ("store_cache", store_cache)])  # fmt: skip
        out = self.inference_mgr(self._icl_predictions_with_cache, inputs=inputs)
        if store_cache:
            out = out[:, y_train.shape[1] :]
        if self.max_classes == 0:
            return out
        return _classify(out, num_classes, return_logits, softmax_temperature)

    def forward_with_repr_cache(self, R: torch.Tensor, train_size: int, num_classes: int | None = None,
                                return_logits: bool = True, softmax_temperature: float = 0.9,
                                mgr_config=None) -> torch.Tensor:  # fmt: skip
        """The package's predictor over cached representations, with every rank's class count while building."""
        building = _CACHE_CLASSES.get()
        num_classes = num_classes if building is None else building
        return super().forward_with_repr_cache(R, train_size, num_classes, return_logits, softmax_temperature,
                                               mgr_config)  # fmt: skip
