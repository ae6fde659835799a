"""The one place that knows which torch release provides what.

Mosaic runs on torch 2.11 (the GPU image) and 2.13 (development and CI).
torch 2.13 renamed the single-tensor collectives and deprecated the old
names; 2.11 has only the old ones.
"""

from __future__ import annotations

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = ["all_gather_single", "reduce_scatter_single"]
