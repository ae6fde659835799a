"""Helpers of the integration tests: random weights, gradients by name, comparisons at fp32 1e-5."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

TOL = 1e-5
WORLDS = (1, 2, 3, 4)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values (in place), the same in every process for the same seed.

    The packages zero-initialise output projections and the last MLP layers (residual
    branches start as the identity), and QASSMax's query MLP: with those weights a
    sharded attention could be wrong and still match. Scales keep activations O(1).
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


def named_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name (zeros for a parameter that got none)."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal within ``TOL`` of the reference's scale (its largest magnitude, at least 1), as docs/testing.md says.

    A gradient summed over many rows in another order (each rank its own rows, then
    over ranks) differs from the unsharded sum by rounding that grows with its magnitude.
    """
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=TOL * scale, rtol=TOL, msg=lambda m: f"{what}: {m}")


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: parameters differ: {sorted(set(got) ^ set(want))}"
    for name, grad in got.items():
        assert_close(grad, want[name], f"{what}: grad of {name}")


def max_difference(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest absolute difference over pairs of tensors (for tests that must tell results apart)."""
    return max(float((a - b).detach().abs().max()) for a, b in pairs if a.numel())
