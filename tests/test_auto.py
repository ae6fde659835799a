"""backend="auto" and mosaic.explain: the ranking, its reasons, and that auto's choice is exact."""

from __future__ import annotations

import torch

import mosaic
from mosaic.testing import run_conformance, run_distributed


def _ranking(world: int) -> dict:
    ctx = mosaic.init(sp_size=world)
    torch.manual_seed(0)
    # 3 heads over 2 ranks: ulysses can't split them; mesh2d has no proper 2-D mesh of 2 ranks.
    module = mosaic.MultiAxisAttention(
        24, 3, 1, backend="auto", backend_options={"candidates": ("ring", "ulysses", "mesh2d")}
    )
    x = ctx.shard(torch.randn(2, 10, 3, 24), 1)
    explanation = mosaic.explain(module, x, kv_len=7)
    y = module(x, kv_len=7)
    return {
        "chosen": explanation.chosen.backend,
        "rejected": {c.backend: list(c.reasons) for c in explanation if not c.accepted},
        "text": str(explanation),
        "ran": type(explanation.plan).__name__,
        "shape": tuple(y.shape),
    }


def test_a_problem_only_one_backend_accepts_picks_it_and_explain_lists_every_rejection() -> None:
    for result in run_distributed(_ranking, 2, 2):
        assert result["chosen"] == "ring" and result["ran"] == "RingPlan" and result["shape"] == (2, 5, 3, 24)
        rejected = result["rejected"]
        assert set(rejected) == {"ulysses", "mesh2d"}
        assert any("heads 3" in r and "not divisible" in r for r in rejected["ulysses"])
        assert rejected["mesh2d"] == ["has no option set to try without explicit options"]
        assert "<- chosen" in result["text"] and "rejected:" in result["text"]


def _budget(world: int) -> dict:
    ctx = mosaic.init(sp_size=world)
    module = mosaic.MultiAxisAttention(
        16, 4, 1, backend="auto", backend_options={"candidates": ("ring", "allgather"), "memory_budget": 20000.0}
    )
    explanation = mosaic.explain(module, ctx.shard(torch.randn(1, 64, 2, 16), 1))
    return {c.backend: (c.accepted, c.cost.memory if c.cost else None, c.reasons) for c in explanation}


def test_a_memory_budget_rejects_the_plans_that_do_not_fit() -> None:
    result = run_distributed(_budget, 4, 4)[0]
    accepted = {name for name, (ok, _, _) in result.items() if ok}
    assert accepted == {"ring"}, result
    assert "over the budget" in result["allgather"][2][0]
    assert result["allgather"][1] > 20000.0 >= result["ring"][1]


def test_auto_is_exact_on_the_standard_cases() -> None:
    run_conformance("auto", world_sizes=(1, 2, 3))


def test_one_process_explain_ranks_every_installed_backend() -> None:
    mosaic.init()
    try:
        module = mosaic.MultiAxisAttention(16, 4, 1)
        explanation = mosaic.explain(module, torch.randn(2, 6, 16))
        names = {c.backend for c in explanation}
        assert {"local", "ring", "allgather"} <= names and "auto" not in names
        assert explanation.chosen is not None
    finally:
        mosaic.shutdown()
