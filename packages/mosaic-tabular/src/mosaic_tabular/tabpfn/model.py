"""A TabPFN model (tabpfn 9.2) with its rows sharded over the sp group: :func:`shard_tabpfn`.

The model keeps its class's code, modules and weights; three things change,
each where the package computes over rows:

- the attention between the cells of a column goes through tabpfn's attention
  registry to a Mosaic strategy (:mod:`.attention`);
- the input encoder's statistics over rows (the constant-feature mask, the
  NaN/inf imputation means, the standard scaler, the feature-group
  normalisation, the target imputation) are computed over every rank's rows
  with ``mosaic.sharded`` and handed to the package's own encoder through the
  parameters its K/V-cache path reads them from;
- the thinking rows (v2.5, v2.6), which lead the table, are held by sp rank 0.

After :func:`shard_tabpfn` the model's ``forward`` takes this rank's rows (in
order: the training rows of the table first) and the labels of this rank's
training rows, and returns the outputs of this rank's test rows. With
``whole_table=True`` (the estimators) it takes the whole table on every rank,
as the package does, runs on this rank's rows and gathers the outputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
from tabpfn.architectures import tabpfn_v2, tabpfn_v2_5, tabpfn_v2_6, tabpfn_v3, tabpfn_v3_5

import mosaic

from ..rows import RowSplit, constant_along_rows, finite_mean, raise_if_any
from ..upstream import check_upstream
from .attention import RowShardedColumnAttentionV2p5, RowShardedColumnAttentionV2p6

__all__ = ["COVERED", "NOT_COVERED", "RowShardedTabPFNV2p5", "RowShardedTabPFNV2p6", "shard_tabpfn"]

NOT_COVERED: dict[type, str] = {
    tabpfn_v2.TabPFNV2: (
        "TabPFN v2's encoder (_embed_features / _embed_targets, with the per-table torch.unique target "
        "densification) is not covered by mosaic-tabular 0.1"
    ),
    tabpfn_v3.TabPFNV3: (
        "TabPFN v3 computes over rows in modules this version does not cover (FeatureDistributionEmbedder, "
        "InducedSelfAttentionBlock, ICLAttention with its softmax scaling by the key count, ManyClassDecoder)"
    ),
    tabpfn_v3_5.TabPFNV3p5: (
        "TabPFN v3.5 computes over rows in modules this version does not cover (FeatureDistributionEmbedder, "
        "InducedSelfAttentionBlock, ICLAttention with its softmax scaling by the key count, MultiTaskHeads)"
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
    pass


class RowShardedThinkingRowsV2p6(_RowShardedThinkingRows, tabpfn_v2_6.AddThinkingRows):
    pass


class _RowShardedTabPFN:
    """The methods of a TabPFN v2.5/v2.6 model that see rows, over rows sharded on the sp group."""

    arch: ModuleType  # the architecture's module (its helper functions)
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

    def _rows_forward(self, x, y, **kwargs):
        if y is not None and not isinstance(y, dict):
            # The package raises here from this rank's labels only: every rank must hear of it.
            out_of_range = not self.training and self.task_type == "multiclass" and bool((y > self.n_out - 1).any())
            raise_if_any(out_of_range, ValueError(
                "Target is out of range on some rank. Make sure to use an ordinal encoded target. Expected "
                f"target values between 0 and {self.n_out - 1}."))  # fmt: skip
        return super().forward(x, y, **kwargs)

    def _whole_table_forward(self, x, y, **kwargs):
        if kwargs["kv_cache"] is not None or kwargs["return_kv_cache"] or kwargs["x_is_test_only"]:
            raise NotImplementedError(
                "mosaic-tabular 0.1 does not cover TabPFN's K/V cache (fit_mode='fit_with_cache', kv_cache, "
                "return_kv_cache, x_is_test_only) on the whole table; use fit_mode='fit_preprocessors' or "
                "'low_memory'"
            )
        x = x["main"] if isinstance(x, dict) else x
        y = y["main"] if isinstance(y, dict) else y
        rows = RowSplit.of(x.shape[0], 0 if y is None else y.shape[0])
        out = self._rows_forward(rows.take(x, 0), None if y is None else rows.take_train(y, 0), **kwargs)
        ctx = mosaic.get_context()
        if isinstance(out, dict):
            return {name: ctx.unshard(t, 0) for name, t in out.items()}
        return ctx.unshard(out, 0)

    def _preprocess_and_embed_features(
        self,
        x_RiBC: torch.Tensor,
        num_train_labels: int,
        batch_size: int,
        *,
        scaler_cache: dict[str, torch.Tensor] | None = None,
        feature_state: dict[str, torch.Tensor] | None = None,
        return_state: bool = False,
    ):
        """The package's encoder, fed the statistics of every rank's rows through its cache-path parameters."""
        if feature_state is None:
            scaler_cache, feature_state = self._fit_feature_state(x_RiBC, num_train_labels)
        embedded, scaler_out, state_out = super()._preprocess_and_embed_features(
            x_RiBC, num_train_labels, batch_size, scaler_cache=scaler_cache, feature_state=feature_state,
            return_state=return_state,
        )  # fmt: skip
        raise_if_any(bool(torch.isnan(embedded).any()), ValueError(
            "Found NaNs in the encoded x on some rank. Make sure to use a NaN-handling encoder."))  # fmt: skip
        return embedded, scaler_out, state_out

    def _fit_feature_state(self, x_RiBC: torch.Tensor, local_train: int):
        """What the package's encoder fits on the rows (train rows for means and scales), over every rank's rows."""
        arch = self.arch
        rows = mosaic.sharded.total(x_RiBC.shape[0])
        if rows <= 1:
            column_mask = torch.ones(x_RiBC.shape[1:], dtype=torch.bool, device=x_RiBC.device)
        else:
            column_mask = ~constant_along_rows(x_RiBC)
        x, _ = arch._remove_constant_features(x_RiBC=x_RiBC, column_mask=column_mask)
        x, _ = arch._pad_and_reshape_feature_groups(x_RiBC=x, num_features_per_group=self.features_per_group)
        x, _ = arch._impute_nan_and_inf_with_mean(x=x, num_train_rows=local_train,
                                                  scaler_cache={"mean": finite_mean(x, local_train)})  # fmt: skip
        fit_all = mosaic.sharded.total(local_train) == 0  # the package fits on every row then
        scaler_cache = _fit_standard_scaler(x if fit_all else x[:local_train])
        x = self.standard_scaler.transform(x, fitted_cache=scaler_cache)
        if rows <= 1:
            normalize_mask = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
        else:
            normalize_mask = ~constant_along_rows(x)
        used = torch.clip(normalize_mask.sum(-1).unsqueeze(-1), min=1)
        return scaler_cache, {"column_mask": column_mask, "normalize_mask": normalize_mask, "normalize_used": used}

    def _preprocess_and_embed_targets(
        self, y: torch.Tensor, num_train_rows: int, num_train_labels: int, batch_size: int
    ) -> torch.Tensor:
        """The package's target encoder with the training labels' mean (for imputation) over every rank's rows.

        As tabpfn's ``_impute_target_nan_and_inf``: NaN/inf targets (the test rows' padding) get the
        mean of the finite training targets, rounded up for classification.
        """
        arch = self.arch
        if y.shape[0] == 0:
            # A rank without training rows: the package's reshape of no labels has no shape to infer.
            y_RiB1 = torch.full((num_train_rows, 1 if y.ndim == 1 else batch_size, 1), float("nan"),
                                dtype=y.dtype, device=y.device)  # fmt: skip
        else:
            y_RiB1 = arch._prepare_targets(y=y, num_train_rows=num_train_rows, batch_size=batch_size)
        indicator = arch._generate_nan_and_inf_indicator(x=y_RiB1)
        bad = ~y_RiB1.isfinite()
        mean = finite_mean(y_RiB1, num_train_labels).unsqueeze(0).expand_as(y_RiB1)
        imputed = torch.where(bad, mean, y_RiB1)
        if self.task_type != "regression":
            imputed = torch.where(bad, imputed.ceil(), imputed)
        embedded = self.target_embedder(torch.cat([imputed, indicator], dim=-1))
        raise_if_any(bool(torch.isnan(embedded).any()), ValueError(
            "Found NaNs in the encoded y on some rank. Make sure to use a NaN-handling encoder."))  # fmt: skip
        return embedded.transpose(0, 1)


def _fit_standard_scaler(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """tabpfn's ``TorchStandardScaler.fit`` over every rank's rows (NaN-aware mean, std with n - 1)."""
    valid = ~x.isnan()
    n = mosaic.sharded.count(x, 0, mask=valid).to(x.dtype)
    zero = torch.zeros_like(x)
    mean = mosaic.sharded.sum(torch.where(valid, x, zero), 0) / n.clamp(min=1.0)
    squares = mosaic.sharded.sum(torch.where(valid, (x - mean).square(), zero), 0)
    std = torch.sqrt(squares / (n - 1).clamp(min=1.0))
    std = torch.where(std == 0, torch.ones_like(std), std)
    if mosaic.sharded.total(x.shape[0]) == 1:
        std = torch.ones_like(std)
    return {"mean": mean, "std": std}


class RowShardedTabPFNV2p5(_RowShardedTabPFN, tabpfn_v2_5.TabPFNV2p5):
    """tabpfn's ``TabPFNV2p5`` on rows sharded over the sp group (made by :func:`shard_tabpfn`)."""

    arch = tabpfn_v2_5


class RowShardedTabPFNV2p6(_RowShardedTabPFN, tabpfn_v2_6.TabPFNV2p6):
    """tabpfn's ``TabPFNV2p6`` on rows sharded over the sp group (made by :func:`shard_tabpfn`)."""

    arch = tabpfn_v2_6


# The architectures covered: the package's class -> the row-sharded classes of the model, its thinking
# rows and its attention between the cells of a column.
COVERED: dict[type, tuple[type, type, type]] = {
    tabpfn_v2_5.TabPFNV2p5: (RowShardedTabPFNV2p5, RowShardedThinkingRowsV2p5, RowShardedColumnAttentionV2p5),
    tabpfn_v2_6.TabPFNV2p6: (RowShardedTabPFNV2p6, RowShardedThinkingRowsV2p6, RowShardedColumnAttentionV2p6),
}


def shard_tabpfn(model: nn.Module, backend: str = "auto", *, whole_table: bool = False) -> nn.Module:
    """Make a tabpfn model run on rows sharded over the sp group, in place (same modules and weights).

    Args:
        model: a TabPFN v2.5 or v2.6 architecture (``TabPFNV2p5``, ``TabPFNV2p6``), as
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
    sharded, thinking, column_attention = COVERED[base]
    model.__class__ = sharded
    model.mosaic_whole_table = whole_table
    # The package checks the encoded input for NaNs on this rank's rows; the sharded encoder checks
    # every rank's (and raises on all of them).
    model._do_encoder_nan_check = False
    model.add_thinking_rows.__class__ = thinking
    if ctx.sp_rank != 0:
        # ``_decode`` skips this many leading rows to find the training rows' embeddings.
        model.add_thinking_rows.mosaic_holds_thinking_rows = False
        model.add_thinking_rows.num_thinking_rows = 0
    for module in model.modules():
        if isinstance(module, model.arch.AlongColumnAttention):
            module.__class__ = column_attention
            module.mosaic_backend = backend
    return model
