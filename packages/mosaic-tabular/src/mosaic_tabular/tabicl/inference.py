"""TabICL's inference manager with one batch size for every rank.

The column embedder and the ICL predictor run their model in batches of tables
sized to this device's free memory; inside each batch are sharded calls, which
need the same batches on every rank, so every rank takes the smallest size any
rank estimates.
"""

from __future__ import annotations

from tabicl._model.inference import InferenceManager

import mosaic

__all__ = ["AgreedInferenceManager"]


class AgreedInferenceManager(InferenceManager):
    """tabicl's ``InferenceManager`` whose batch size is the smallest any rank estimates (made by class swap)."""

    def estimate_safe_batch_size(self, seq_len: int, include_inputs: bool = True, in_dim: int | None = None,
                                 max_bs: int = 50000) -> tuple[float, int]:  # fmt: skip
        memory, batch = super().estimate_safe_batch_size(seq_len, include_inputs, in_dim, max_bs)
        return memory, mosaic.sharded.agree(batch, "min")
