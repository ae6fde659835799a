"""Comparisons of the tests: fp32, within 1e-5 of the reference's scale (docs/testing.md's rule)."""

from __future__ import annotations

import torch

TOL = 1e-5
WORLDS = (1, 2, 3, 4)


def assert_close(got, want, what: str) -> None:
    got, want = torch.as_tensor(got), torch.as_tensor(want)  # tensors, numpy arrays, lists
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=TOL * scale, rtol=TOL, msg=lambda m: f"{what}: {m}")


def max_difference(got, want) -> float:
    return float((torch.as_tensor(got) - torch.as_tensor(want)).abs().max())
