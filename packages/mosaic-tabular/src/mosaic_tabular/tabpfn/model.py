"""A TabPFN model (tabpfn 9.2) with its rows sharded over the sp group: :func:`shard_tabpfn`.

The model keeps its class's code, modules and weights; three things change,
each where the package computes over rows:

- the attention between the cells of a column goes through tabpfn's attention
  registry to a Mosaic strategy (:mod:`.attention`);
- the input encoder's statistics over rows are computed over every rank's rows
  and handed to the package's own encoder (:mod:`.encoders`);
- the thinking rows (v2.5, v2.6), which lead the table, are held by sp rank 0.

After :func:`shard_tabpfn` the model's ``forward`` takes this rank's rows (in
order: the training rows of the table first) and the labels of this rank's
training rows, and returns the outputs of this rank's test rows. With
``whole_table=True`` (the estimators) it takes the whole table on every rank,
as the package does, runs on this rank's rows and gathers the outputs.

The K/V cache (``return_kv_cache=True``, then ``kv_cache=`` with
``x_is_test_only=True``; the estimators' ``fit_mode="fit_with_cache"``) is each
rank's: it holds the keys/values of this rank's training rows (rank 0 also the
thinking rows') and the encoder statistics of every rank's rows, and a test
row attends to every rank's cached rows. With ``whole_table=True`` the test
rows are split over the ranks on their own (a rank may hold none).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
from tabpfn.architectures import tabpfn_v2, tabpfn_v2_5, tabpfn_v2_6, tabpfn_v3, tabpfn_v3_5

import mosaic

from ..rows import RowSplit, raise_if_any
from ..upstream import check_upstream
from .attention import (
    RowShardedColumnAttentionV2,
    RowShardedColumnAttentionV2p5,
    RowShardedColumnAttentionV2p6,
    RowsLocalFeatureAttentionV2,
    RowsLocalFeatureAttentionV2p5,
    RowsLocalFeatureAttentionV2p6,
)
from .encoders import RowShardedEncoderV2, RowShardedEncoderV2p5

__all__ = [
    "COVERED",
    "NOT_COVERED",
    "RowShardedTabPFNV2",
    "RowShardedTabPFNV2p5",
    "RowShardedTabPFNV2p6",
    "shard_tabpfn",
]

# Their attention goes through tabpfn's registry, but what surrounds it computes over rows where a
# registry backend cannot reach (docs/tabular.md, "Not covered", lists each place).
_V3_REASON = (
    "its row attention goes through tabpfn's registry, but the query scaling by the key count "
    "(SoftmaxScalingMLP, applied before the dispatcher: the InducedSelfAttentionBlock's inducing points, "
    "ICLAttention, {decoder}) would count this rank's keys, ICLAttention makes its test-row call only on a rank "
    "with test rows, the decoder skips its attention on a rank without test rows, {labels}, _stages_0_to_2 "
    "chooses its row chunks from this rank's row count{extra}, and int8/fp8 K/V caches are quantized with this "
    "rank's scale; see docs/tabular.md"
)
NOT_COVERED: dict[type, str] = {
    tabpfn_v3.TabPFNV3: _V3_REASON.format(
        decoder="the ManyClassDecoder",
        labels="forward sizes the classes by int(y.max()) of this rank's labels (none without training rows)",
        extra="",
    ),
    tabpfn_v3_5.TabPFNV3p5: _V3_REASON.format(
        decoder="the ManyClassDecoder of its MultiTaskHeads",
        labels="forward counts the classes (num_present_classes) from this rank's labels",
        extra=", its in-context ECDF sorts every training value of each column (_build_ecdf_context)",
    ),
}


class _RowShardedThinkingRows:
    """``AddThinkingRows`` of a model whose rows are sharded: the thinking rows lead the table, so rank 0 holds them."""

    mosaic_holds_thinking_rows: bool = True

    def forward(self, x_BRiCE: torch.Tensor, single_eval_pos: int) -> tuple[torch.Tensor, int]:
        if self.mosaic_holds_thinking_rows:
            return super().forward(x_BRiCE, single_eval_pos)
        return x_BRiCE, single_eval_pos


class RowShardedThinkingRowsV2p5(_RowShardedThinkingRows, tabpfn_v2_5.AddThinkingRows):
    """RowShardedThinkingRows over tabpfn's tabpfn_v2_5.AddThinkingRows."""


class RowShardedThinkingRowsV2p6(_RowShardedThinkingRows, tabpfn_v2_6.AddThinkingRows):
    """RowShardedThinkingRows over tabpfn's tabpfn_v2_6.AddThinkingRows."""


class _RowShardedTabPFN:
    """The forward of a TabPFN model (v2, v2.5, v2.6) over rows sharded on the sp group."""

    arch: ModuleType  # the architecture's module (its helper functions)
    mosaic_checks_target_range: bool = True  # v2.5 and v2.6 check the labels' range in forward
    mosaic_cache_skips_training_rows: bool = True  # v2.5 and v2.6 predict from a cache past the cached rows
    mosaic_whole_table: bool = False

    def forward(
        self,
        x: torch.Tensor | dict[str, torch.Tensor],
        y: torch.Tensor | dict[str, torch.Tensor] | None,
        *,
        only_return_standard_out: bool = True,
        categorical_inds: list[list[int]] | None = None,
        performance_options: Any = None,
        task_type: str | None = None,
        kv_cache: Any = None,
        return_kv_cache: bool = False,
        x_is_test_only: bool = False,
    ) -> Any:
        """The package's forward; on this rank's rows, or (``mosaic_whole_table``) on the whole table."""
        kwargs = dict(only_return_standard_out=only_return_standard_out, categorical_inds=categorical_inds,
                      performance_options=performance_options, task_type=task_type, kv_cache=kv_cache,
                      return_kv_cache=return_kv_cache, x_is_test_only=x_is_test_only)  # fmt: skip
        if self.mosaic_whole_table:
            return self._whole_table_forward(x, y, **kwargs)
        return self._rows_forward(x, y, **kwargs)

    def _rows_forward(self, x, y, *, performance_options: Any = None, **kwargs):
        if self.mosaic_checks_target_range and y is not None and not isinstance(y, dict):
            # The package raises here from this rank's labels only: every rank must hear of it.
            out_of_range = not self.training and self.task_type == "multiclass" and bool((y > self.n_out - 1).any())
            raise_if_any(out_of_range, ValueError(
                "Target is out of range on some rank. Make sure to use an ordinal encoded target. Expected "
                f"target values between 0 and {self.n_out - 1}."))  # fmt: skip
        return super().forward(x, y, performance_options=self._agreed(performance_options), **kwargs)

    def _agreed(self, options: Any) -> Any:
        """The performance options with one memory-saving factor for every rank (the largest any rank asks).

        The estimators choose it from this device's free memory; it sets how many chunks the
        blocks split the batch into, each chunk a sharded call, which every rank must make alike.
        """
        options = self.get_default_performance_options() if options is None else options
        factor = mosaic.sharded.agree(options.save_peak_memory_factor or 0, "max")
        return dataclasses.replace(options, save_peak_memory_factor=factor or None)

    def _whole_table_forward(self, x, y, **kwargs):
        x = x["main"] if isinstance(x, dict) else x
        y = y["main"] if isinstance(y, dict) else y
        kv_cache = kwargs["kv_cache"]
        if kv_cache is not None and not kv_cache.is_empty():
            if not kwargs["x_is_test_only"] and self.mosaic_cache_skips_training_rows:
                # The package skips the rows the cache was built from: every rank's training rows.
                x = x[mosaic.sharded.total(kv_cache.train_shape[1]) :]
            kwargs["x_is_test_only"] = True  # v2 treats every row as a test row either way
            # Only test rows: split over the ranks on their own; the labels only checked.
            rows = RowSplit.of(x.shape[0], 0)
            out = self._rows_forward(rows.take(x, 0), y, **kwargs)
        elif kwargs["x_is_test_only"]:
            return self._rows_forward(x, y, **kwargs)  # the package raises: no cache to predict from
        else:
            rows = RowSplit.of(x.shape[0], 0 if y is None else y.shape[0])
            out = self._rows_forward(rows.take(x, 0), None if y is None else rows.take_train(y, 0), **kwargs)
        if kwargs["return_kv_cache"]:
            output, cache = out
            return _gathered(output), cache  # the cache stays this rank's
        return _gathered(out)


def _gathered(out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Every rank's rows of the outputs (dim 0: test rows, or training rows for ``train_embeddings``)."""
    ctx = mosaic.get_context()
    if isinstance(out, dict):
        return {name: ctx.unshard(t, 0) for name, t in out.items()}
    return ctx.unshard(out, 0)


class RowShardedTabPFNV2(_RowShardedTabPFN, RowShardedEncoderV2, tabpfn_v2.TabPFNV2):
    """tabpfn's ``TabPFNV2`` on rows sharded over the sp group (made by :func:`shard_tabpfn`)."""

    arch = tabpfn_v2
    mosaic_checks_target_range = False
    mosaic_cache_skips_training_rows = False


class RowShardedTabPFNV2p5(_RowShardedTabPFN, RowShardedEncoderV2p5, tabpfn_v2_5.TabPFNV2p5):
    """tabpfn's ``TabPFNV2p5`` on rows sharded over the sp group (made by :func:`shard_tabpfn`)."""

    arch = tabpfn_v2_5


class RowShardedTabPFNV2p6(_RowShardedTabPFN, RowShardedEncoderV2p5, tabpfn_v2_6.TabPFNV2p6):
    """tabpfn's ``TabPFNV2p6`` on rows sharded over the sp group (made by :func:`shard_tabpfn`)."""

    arch = tabpfn_v2_6


# The architectures covered: the package's class -> the row-sharded class.
COVERED: dict[type, type] = {
    tabpfn_v2.TabPFNV2: RowShardedTabPFNV2,
    tabpfn_v2_5.TabPFNV2p5: RowShardedTabPFNV2p5,
    tabpfn_v2_6.TabPFNV2p6: RowShardedTabPFNV2p6,
}
# Their modules that see rows: the package's class -> the row-sharded class (same parameters).
_MODULES: dict[type, type] = {
    tabpfn_v2.AlongColumnAttention: RowShardedColumnAttentionV2,
    tabpfn_v2.AlongRowAttention: RowsLocalFeatureAttentionV2,
    tabpfn_v2_5.AlongColumnAttention: RowShardedColumnAttentionV2p5,
    tabpfn_v2_5.AlongRowAttention: RowsLocalFeatureAttentionV2p5,
    tabpfn_v2_5.AddThinkingRows: RowShardedThinkingRowsV2p5,
    tabpfn_v2_6.AlongColumnAttention: RowShardedColumnAttentionV2p6,
    tabpfn_v2_6.AlongRowAttention: RowsLocalFeatureAttentionV2p6,
    tabpfn_v2_6.AddThinkingRows: RowShardedThinkingRowsV2p6,
}


def shard_tabpfn(model: nn.Module, backend: str = "auto", *, whole_table: bool = False) -> nn.Module:
    """Make a tabpfn model run on rows sharded over the sp group, in place (same modules and weights).

    Args:
        model: a TabPFN v2, v2.5 or v2.6 architecture (``TabPFNV2``, ``TabPFNV2p5``, ``TabPFNV2p6``), as
            ``tabpfn.model_loading.load_model_criterion_config`` or an estimator's ``models_`` give it.
        backend: the Mosaic strategy over rows (``mosaic.available_backends()``; ``"auto"`` picks one per call).
        whole_table: ``forward`` takes the whole table on every rank (as the package's forward does)
            and returns every test row's output; otherwise this rank's rows, and its test rows' outputs.

    Raises:
        NotImplementedError: for an architecture this version does not cover (the reason named).
        mosaic.BackendUnavailable: for a backend that is not installed.
    """
    check_upstream("tabpfn")
    mosaic.get_backend(backend)
    ctx = mosaic.get_context()
    if isinstance(model, _RowShardedTabPFN):
        base = next(c for c in type(model).__mro__ if c in COVERED)
    else:
        base = type(model)
    if base not in COVERED:
        reason = NOT_COVERED.get(base, "it is not one of the architectures tabpfn 9.2 ships")
        raise NotImplementedError(f"mosaic-tabular can't shard the rows of {base.__name__}: {reason}")
    model.__class__ = COVERED[base]
    model.mosaic_whole_table = whole_table
    # The package checks the encoded input for NaNs on this rank's rows; the sharded encoder checks
    # every rank's (and raises on all of them).
    model._do_encoder_nan_check = False
    for module in model.modules():
        swapped = _MODULES.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
        if isinstance(module, _RowShardedThinkingRows) and ctx.sp_rank != 0:
            # ``_decode`` skips this many leading rows to find the training rows' embeddings.
            module.mosaic_holds_thinking_rows = False
            module.num_thinking_rows = 0
        if isinstance(module, model.arch.AlongColumnAttention):
            module.mosaic_backend = backend
    return model
