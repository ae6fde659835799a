"""Random weights that exercise every part of a model (for tests and demos without a pretrained checkpoint)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["randomize_"]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values in place, the same in every process for the same seed.

    TabPFN and TabICL zero-initialise output projections, the last MLP layers
    (residual branches start as the identity) and TabICL's QASSMax query MLP: with
    those weights a wrong sharded attention could still give the right output.
    The scales keep activations of order 1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module
