"""The conformance kit on a third-party plugin: a backend written with Mosaic's public API only.

``gather_all`` gathers every rank's keys with the differentiable ``ctx.unshard``
and attends with ``mosaic.attention(backend="local")``. It declares no causal
support, so the kit runs every standard case but the causal ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mosaic
from mosaic.testing import STANDARD_CASES, cases_for, run_conformance, run_distributed


@dataclass(frozen=True)
class GatherAllPlan(mosaic.Plan):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.problem
        keys, values = (p.context.unshard(t, 2, p.kv_layout.kind) for t in (k, v))
        return mosaic.attention(q, keys, values, kv_len=p.kv_len, scale=p.scale)


class GatherAll(mosaic.Backend):
    name = "gather_all"
    capabilities = mosaic.Capabilities(causal=False)

    def plan(self, problem: mosaic.AttentionProblem) -> mosaic.Plan:
        return GatherAllPlan(problem, mosaic.Cost())


def test_the_kit_filters_cases_by_declared_support() -> None:
    kept, skipped = cases_for("gather_all", 2)
    assert set(skipped) == {c.name for c in STANDARD_CASES if c.causal}
    assert all("causal=True not supported" in r[0] for r in skipped.values())
    assert len(kept) + len(skipped) == len(STANDARD_CASES)


def test_a_plugin_runs_the_kit_with_one_call() -> None:
    results = run_conformance("gather_all", world_sizes=(1, 2, 3), setup=register)
    assert all(len(r) == len(STANDARD_CASES) - sum(c.causal for c in STANDARD_CASES) for r in results.values())


def test_a_wrong_plugin_fails_the_kit() -> None:
    with pytest.raises(AssertionError, match="fails conformance"):
        run_conformance("local_keys_only", world_sizes=(2,), setup=register)


class LocalKeysOnly(GatherAll):
    """Wrong on purpose: attends to this rank's keys only."""

    name = "local_keys_only"

    def plan(self, problem):
        return _LocalKeysPlan(problem, mosaic.Cost())


@dataclass(frozen=True)
class _LocalKeysPlan(mosaic.Plan):
    def __call__(self, q, k, v):
        return mosaic.attention(q, k, v, scale=self.problem.scale)


def register() -> None:
    """What the plugin's package would do through its entry point; run on every rank."""
    for cls in (GatherAll, LocalKeysOnly):
        mosaic.register_backend(cls.name, cls, override=True)


def unregister() -> None:
    for cls in (GatherAll, LocalKeysOnly):
        mosaic.unregister_backend(cls.name)


@pytest.fixture(autouse=True)
def plugins():
    """Registered here and in the worker processes only while a test runs (``auto`` would rank them)."""
    register()
    yield
    unregister()
    for world in (1, 2, 3):
        run_distributed(unregister, world)
