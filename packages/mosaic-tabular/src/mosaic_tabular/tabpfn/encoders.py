"""TabPFN's input encoders with their statistics over rows taken over every rank's rows.

Each architecture's encoder fits statistics on the rows it is given — the
constant-feature mask and the feature-group normalisation over every row, the
NaN/inf imputation means and the standard scaler over the training rows, the
target imputation mean (and, for v2's classifier, the distinct training
labels) — and then applies them. Its K/V-cache path takes fitted statistics as
parameters instead: the mixins here fit them over every rank's rows with
``mosaic.sharded`` and hand them to the package's encoder through those
parameters, so the package's own code applies them. The targets, whose
encoder has no such parameters, are encoded by the package's helper functions
with the global statistics.

- :class:`RowShardedEncoderV2p5`: v2.5 and v2.6 (``_preprocess_and_embed_features``
  with ``scaler_cache``/``feature_state``; ``_preprocess_and_embed_targets``);
- :class:`RowShardedEncoderV2`: v2 (``_embed_features`` with ``feature_cache``;
  ``_embed_targets``, with the per-table ``torch.unique`` densification of the labels).

The package checks the encoded input for NaNs on the rows it has; here every
rank's check raises on all of them.
"""

from __future__ import annotations

from types import ModuleType

import torch

import mosaic

from ..rows import constant_along_rows, finite_mean, raise_if_any

__all__ = ["RowShardedEncoderV2", "RowShardedEncoderV2p5", "fit_standard_scaler"]


def fit_standard_scaler(x: torch.Tensor) -> dict[str, torch.Tensor]:
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


def _non_constant(x: torch.Tensor, *, one_row: bool) -> torch.Tensor:
    """Features that are not constant over every rank's rows; for a table of one row, ``one_row`` for all."""
    if mosaic.sharded.total(x.shape[0]) <= 1:
        return torch.full(x.shape[1:], one_row, dtype=torch.bool, device=x.device)
    return ~constant_along_rows(x)


def _targets(arch: ModuleType, y: torch.Tensor, num_rows: int, batch_size: int) -> torch.Tensor:
    """The package's ``_prepare_targets``: ``(num_rows, B, 1)``, NaN past this rank's labels; also for none."""
    if y.shape[0] == 0:
        # The package's reshape of no labels has no shape to infer.
        shape = (num_rows, 1 if y.ndim == 1 else batch_size, 1)
        return torch.full(shape, float("nan"), dtype=y.dtype, device=y.device)
    return arch._prepare_targets(y, num_rows, batch_size)


def _check_encoded(embedded: torch.Tensor, what: str) -> torch.Tensor:
    raise_if_any(bool(torch.isnan(embedded).any()), ValueError(
        f"Found NaNs in the encoded {what} on some rank. Make sure to use a NaN-handling encoder."))  # fmt: skip
    return embedded


class RowShardedEncoderV2p5:
    """The encoder methods of TabPFN v2.5/v2.6 (``arch`` the architecture's module) over every rank's rows."""

    arch: ModuleType

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
        return _check_encoded(embedded, "x"), scaler_out, state_out

    def _fit_feature_state(self, x_RiBC: torch.Tensor, local_train: int):
        """What the package's encoder fits on the rows (train rows for means and scales), over every rank's rows."""
        arch = self.arch
        column_mask = _non_constant(x_RiBC, one_row=True)
        x, _ = arch._remove_constant_features(x_RiBC=x_RiBC, column_mask=column_mask)
        x, _ = arch._pad_and_reshape_feature_groups(x_RiBC=x, num_features_per_group=self.features_per_group)
        x, _ = arch._impute_nan_and_inf_with_mean(x=x, num_train_rows=local_train,
                                                  scaler_cache={"mean": finite_mean(x, local_train)})  # fmt: skip
        fit_all = mosaic.sharded.total(local_train) == 0  # the package fits on every row then
        scaler_cache = fit_standard_scaler(x if fit_all else x[:local_train])
        x = self.standard_scaler.transform(x, fitted_cache=scaler_cache)
        normalize_mask = _non_constant(x, one_row=False)
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
        y_RiB1 = _targets(arch, y, num_train_rows, batch_size)
        indicator = arch._generate_nan_and_inf_indicator(x=y_RiB1)
        bad = ~y_RiB1.isfinite()
        mean = finite_mean(y_RiB1, num_train_labels).unsqueeze(0).expand_as(y_RiB1)
        imputed = torch.where(bad, mean, y_RiB1)
        if self.task_type != "regression":
            imputed = torch.where(bad, imputed.ceil(), imputed)
        embedded = self.target_embedder(torch.cat([imputed, indicator], dim=-1))
        return _check_encoded(embedded, "y").transpose(0, 1)


class RowShardedEncoderV2:
    """The encoder methods of TabPFN v2 (``arch`` its module) over every rank's rows."""

    arch: ModuleType

    def _embed_features(
        self,
        x_RSF: torch.Tensor,
        *,
        num_train_labels: int,
        num_feature_groups: int,
        batch_size: int,
        feature_cache: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The package's encoder, fed the statistics of every rank's rows through its cache-path parameter."""
        if feature_cache is None:
            feature_cache = self._fit_feature_cache(x_RSF, num_train_labels)
        embedded, feature_cache = super()._embed_features(
            x_RSF, num_train_labels=num_train_labels, num_feature_groups=num_feature_groups, batch_size=batch_size,
            feature_cache=feature_cache,
        )  # fmt: skip
        return _check_encoded(embedded, "x"), feature_cache

    def _fit_feature_cache(self, x_RSF: torch.Tensor, local_train: int) -> dict[str, torch.Tensor]:
        """What v2's encoder fits (its ``feature_cache``), over every rank's rows."""
        arch = self.arch
        # The package's mask over one row calls every feature constant (it compares no row with the first).
        column_mask = _non_constant(x_RSF, one_row=False)
        x = arch._remove_constant_features(x_RSF, column_mask)
        means = finite_mean(x, local_train)
        x, _ = arch._impute_nan_and_inf_with_mean(x, local_train, means)
        scaler = fit_standard_scaler(x[:local_train])
        x = self.standard_scaler.transform(x, fitted_cache=scaler)
        group_mask = _non_constant(x, one_row=False)
        return {"column_selection_mask": column_mask, "feature_means": means, "scaler_mean": scaler["mean"],
                "scaler_std": scaler["std"], "ng_non_constant_mask": group_mask,
                "ng_num_used_features": torch.clip(group_mask.sum(-1, keepdim=True), min=1)}  # fmt: skip

    def _embed_targets(
        self, y: torch.Tensor, *, num_rows: int, num_train_labels: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """v2's target encoder with the imputation mean and the distinct training labels of every rank's rows.

        Returns what the package's does: the embedded targets, the means and the distinct
        labels (from which ``_embed_nan_target`` embeds a test row's target for a cache).
        """
        arch = self.arch
        y_RB1 = _targets(arch, y, num_rows, batch_size)
        indicator = arch._generate_nan_and_inf_indicator(y_RB1)
        means = finite_mean(y_RB1, num_train_labels)
        y_RB1, _ = arch._impute_nan_and_inf_with_mean(y_RB1, num_train_labels, means)
        unique_ys: list[torch.Tensor] = []
        if self.use_multiclass_target_encoding:
            unique_ys = [mosaic.sharded.unique(y_RB1[:num_train_labels, b]) for b in range(batch_size)]
            y_RB1 = arch._flatten_multiclass_targets(y_RB1, unique_ys)
        y_concat = torch.cat([y_RB1, indicator], dim=-1).to(self.target_embedder.weight.dtype)
        return _check_encoded(self.target_embedder(y_concat), "y").transpose(0, 1), means, unique_ys
