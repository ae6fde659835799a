"""The upstream functions and classes this package overrides, wraps or calls, with the signatures it expects.

tabpfn and tabicl are imported and called, never copied; some of what is
called is private (tabicl keeps its modules under ``tabicl._model``; tabpfn's
encoder helpers start with ``_``). The versions are pinned (``mosaic-tabular[tabpfn]``,
``[tabicl]``), and :func:`check_upstream` compares each name's parameters with
what the adapters were written against, so that a change upstream is an error
naming the function, not a wrong result. ``tests/test_upstream.py`` runs it.
"""

from __future__ import annotations

import importlib
import inspect

__all__ = ["EXPECTED", "UpstreamChanged", "check_upstream", "signature_changes"]

_V25 = "tabpfn.architectures.tabpfn_v2_5"
_V26 = "tabpfn.architectures.tabpfn_v2_6"
_TABPFN_ENCODER = {
    "_prepare_targets": ["y", "num_train_rows", "batch_size"],
    "_remove_constant_features": ["x_RiBC", "column_mask"],
    "_pad_and_reshape_feature_groups": ["x_RiBC", "num_features_per_group"],
    "_impute_nan_and_inf_with_mean": ["x", "num_train_rows", "scaler_cache"],
    "_impute_target_nan_and_inf": ["y_RiB1", "task_type", "num_train_rows"],
    "_normalize_feature_groups": ["x_RiBF", "num_features_per_group", "params"],
    "_generate_nan_and_inf_indicator": ["x"],
}
_TABPFN_MODEL = {
    "forward": ["self", "x", "y", "only_return_standard_out", "categorical_inds", "performance_options",
                "task_type", "kv_cache", "return_kv_cache", "x_is_test_only"],
    "_preprocess_and_embed_features": ["self", "x_RiBC", "num_train_labels", "batch_size", "scaler_cache",
                                       "feature_state", "return_state"],
    "_preprocess_and_embed_targets": ["self", "y", "num_train_rows", "num_train_labels", "batch_size"],
    "_decode": ["self", "x_BRCD", "test_start", "train_start", "train_end", "only_return_standard_out"],
}  # fmt: skip

_V2 = "tabpfn.architectures.tabpfn_v2"
_TABPFN_V2 = {
    "TabPFNV2.forward": _TABPFN_MODEL["forward"],
    "TabPFNV2._embed_features": ["self", "x_RSF", "num_train_labels", "num_feature_groups", "batch_size",
                                 "feature_cache"],
    "TabPFNV2._embed_targets": ["self", "y", "num_rows", "num_train_labels", "batch_size"],
    "TabPFNV2._embed_nan_target": ["self", "feature_means_B1", "unique_ys", "batch_size"],
    "AlongColumnAttention.forward": ["self", "x_BcRE", "single_eval_pos", "cached_kv", "return_kv"],
    "_prepare_targets": ["y", "num_rows", "batch_size"],
    "_remove_constant_features": ["x_RSF", "non_constant_mask"],
    "_generate_nan_and_inf_indicator": ["x"],
    "_impute_nan_and_inf_with_mean": ["x", "num_train_rows", "feature_means"],
    "_flatten_multiclass_targets": ["y_RB1", "unique_ys"],
    # Computed over every rank's rows in their place (mosaic_tabular.tabpfn.encoders).
    "_constant_feature_mask": ["x_RSF"],
    "_fit_feature_group_scaling": ["x_RSF"],
}  # fmt: skip

# package -> {"module:qualname": expected parameter names}
EXPECTED: dict[str, dict[str, list[str]]] = {
    "tabpfn": {
        **{f"{m}:{name}": params for m in (_V25, _V26) for name, params in _TABPFN_ENCODER.items()},
        **{f"{m}:{cls}.{name}": params for m, cls in ((_V25, "TabPFNV2p5"), (_V26, "TabPFNV2p6"))
           for name, params in _TABPFN_MODEL.items()},
        **{f"{m}:AlongColumnAttention.forward": ["self", "x_BcRE", "single_eval_pos", "cached_kv", "return_kv"]
           for m in (_V25, _V26)},
        **{f"{m}:AddThinkingRows.forward": ["self", "x_BRiCE", "single_eval_pos"] for m in (_V25, _V26)},
        **{f"{_V2}:{name}": params for name, params in _TABPFN_V2.items()},
        "tabpfn.preprocessing.torch.torch_standard_scaler:TorchStandardScaler.transform": ["self", "x",
                                                                                          "fitted_cache"],
        "tabpfn.preprocessing.torch.torch_standard_scaler:TorchStandardScaler.fit": ["self", "x"],
        "tabpfn.architectures.interface:PerformanceOptions": [
            "save_peak_memory_factor", "force_recompute_layer", "use_chunkwise_inference", "enable_torch_compile",
            "kv_cache_dtype", "kv_cache_follows_attention_grid"],
        "tabpfn.architectures.shared.attention_backends:register_attention_backend": ["backends"],
        "tabpfn.architectures.shared.scaled_dot_product_attention:scaled_dot_product_attention": [
            "q_BSHD", "k_BSJD", "v_BSJD", "_backends_override", "quantized_kv", "backend"],
        "tabpfn.classifier:TabPFNClassifier._initialize_model_variables": ["self"],
        "tabpfn.regressor:TabPFNRegressor._initialize_model_variables": ["self"],
        "tabpfn.model_loading:save_tabpfn_model": ["model", "save_path", "additional_fields"],
    },
    "tabicl": {
        "tabicl._model.layers:MultiheadAttention.forward": ["self", "query", "key", "value", "cached_kv",
                                                            "key_padding_mask", "attn_mask", "rope", "need_kv"],
        "tabicl._model.layers:InducedSelfAttentionBlock.forward": ["self", "src", "train_size"],
        "tabicl._model.layers:InducedSelfAttentionBlock.induced_attention": ["self", "src", "train_size"],
        "tabicl._model.layers:InducedSelfAttentionBlock.forward_with_cache": [
            "self", "src", "col_cache", "block_idx", "train_size", "use_cache", "store_cache"],
        "tabicl._model.layers:InducedSelfAttentionBlock.induced_attention_with_cache": [
            "self", "src", "col_cache", "block_idx", "train_size", "use_cache", "store_cache"],
        "tabicl._model.embedding:ColEmbedding._compute_embeddings": ["self", "features", "train_size", "y_train",
                                                                     "embed_with_test"],
        "tabicl._model.embedding:ColEmbedding.forward_with_cache": ["self", "X", "col_cache", "y_train", "use_cache",
                                                                    "store_cache", "mgr_config"],
        "tabicl._model.embedding:ColEmbedding._compute_embeddings_with_cache": [
            "self", "features", "col_cache", "train_size", "y_train", "use_cache", "store_cache"],
        "tabicl._model.embedding:ColEmbedding.feature_grouping": ["self", "X"],
        "tabicl._model.interaction:RowInteraction._aggregate_embeddings": ["self", "embeddings", "key_mask"],
        "tabicl._model.learning:ICLearning._inference_forward": ["self", "R", "y_train", "return_logits",
                                                                 "softmax_temperature", "mgr_config"],
        "tabicl._model.learning:ICLearning._icl_predictions": ["self", "R", "y_train"],
        "tabicl._model.learning:ICLearning.forward_with_cache": [
            "self", "R", "icl_cache", "y_train", "num_classes", "return_logits", "softmax_temperature", "use_cache",
            "store_cache", "mgr_config"],
        "tabicl._model.learning:ICLearning._icl_predictions_with_cache": ["self", "R", "icl_cache", "y_train",
                                                                          "use_cache", "store_cache"],
        "tabicl._model.learning:ICLearning.forward_with_repr_cache": [
            "self", "R", "train_size", "num_classes", "return_logits", "softmax_temperature", "mgr_config"],
        "tabicl._model.inference:InferenceManager.estimate_safe_batch_size": ["self", "seq_len", "include_inputs",
                                                                              "in_dim", "max_bs"],
        "tabicl._model.tabicl:TabICL.forward": ["self", "X", "y_train", "d", "embed_with_test", "feature_shuffles",
                                                "return_logits", "softmax_temperature", "inference_config"],
        "tabicl._model.tabicl:TabICL._inference_forward": ["self", "X", "y_train", "feature_shuffles",
                                                           "embed_with_test", "return_logits",
                                                           "softmax_temperature", "inference_config"],
        "tabicl._model.tabicl:TabICL.forward_with_cache": [
            "self", "X_train", "y_train", "X_test", "return_logits", "softmax_temperature", "use_cache",
            "store_cache", "cache", "cache_mode", "inference_config"],
        # Sharded through the two above, which they call.
        "tabicl._model.tabicl:TabICL.predict_stats": ["self", "X", "y_train", "output_type", "alphas",
                                                      "embed_with_test", "inference_config"],
        "tabicl._model.tabicl:TabICL.predict_stats_with_cache": [
            "self", "X_train", "y_train", "X_test", "output_type", "alphas", "use_cache", "store_cache", "cache",
            "cache_mode", "inference_config"],
        "tabicl._model.kv_cache:TabICLCache": ["col_cache", "row_repr", "icl_cache", "train_shape", "num_classes"],
        "tabicl._sklearn.classifier:TabICLClassifier._load_model": ["self"],
        "tabicl._sklearn.regressor:TabICLRegressor._load_model": ["self"],
    },
}  # fmt: skip


class UpstreamChanged(RuntimeError):
    """tabpfn or tabicl changed something an adapter relies on (the names are in the message)."""


def _resolve(path: str):
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def signature_changes(package: str) -> list[str]:
    """Every expected name of ``package`` that is missing or whose parameters differ, as sentences."""
    changes = []
    for path, want in EXPECTED[package].items():
        try:
            obj = _resolve(path)
        except (ImportError, AttributeError) as exc:
            changes.append(f"{path} is gone ({exc})")
            continue
        got = list(inspect.signature(obj).parameters)
        if got != want:
            changes.append(f"{path} takes ({', '.join(got)}), the adapter expects ({', '.join(want)})")
    return changes


def check_upstream(package: str) -> None:
    """Raise :class:`UpstreamChanged` naming every function of ``package`` that no longer fits."""
    changes = signature_changes(package)
    if changes:
        version = importlib.import_module(package).__version__ if package == "tabpfn" else _version(package)
        raise UpstreamChanged(
            f"{package} {version} differs from the version mosaic-tabular was written for: " + "; ".join(changes)
        )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
