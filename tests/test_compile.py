"""torch.compile (inductor) over models with Mosaic layers: the same outputs and gradients as eager.

The local layer is traced into the graph, and so are the sharded layers whose
plans are traceable (allgather, ulysses, switch): their plan is made — and
agreed — while tracing, their collectives become graph ops, and the graph runs
with no host exchange (``fullgraph=True`` holds). A plan with P2P transfers
(ring) runs eagerly, one graph break per layer, and so does a local layer with
a named kernel (``kernel=``), which runs as it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mosaic
from mosaic.testing import max_error, run_distributed

TOL = 1e-5


class _Block(nn.Module):
    """Feature attention (local, dim 2), row attention over the sharded dim 1, a projection."""

    def __init__(self, backend: str, options: dict | None = None):
        super().__init__()
        self.features = mosaic.MultiAxisAttention(16, 4, 2)
        self.rows = mosaic.MultiAxisAttention(16, 4, 1, backend=backend, backend_options=options)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.features(x)
        x = x + self.rows(x, kv_len=5)
        return self.out(torch.nn.functional.gelu(x))


def _compiled_matches_eager(world: int, backend: str, options: dict | None, fullgraph: bool) -> dict[str, float]:
    import torch._dynamo

    torch._dynamo.reset()
    ctx = mosaic.init(sp_size=world)
    torch.manual_seed(0)
    model = _Block(backend, options)
    x_full, grad_full = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)
    results = []
    # Compiled first: the trace meets no plan made before it (it makes and agrees its own).
    for run in (torch.compile(model, fullgraph=fullgraph), model):
        model.zero_grad(set_to_none=True)
        x = ctx.shard(x_full, 1).clone().requires_grad_()
        y = run(x)
        y.backward(ctx.shard(grad_full, 1))
        mosaic.reduce_gradients(model)
        results.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
    (cy, cdx, cparams), (y, dx, params) = results
    # Where the graph breaks (dynamo counts a break once per frame it unwinds through: count places).
    reasons = torch._dynamo.explain(model)(ctx.shard(x_full, 1)).break_reasons
    breaks = len({(r.user_stack[-1].filename, r.user_stack[-1].lineno) for r in reasons})
    return {
        "out": max_error(cy, y),
        "dx": max_error(cdx, dx),
        "params": max(max_error(c, e) for c, e in zip(cparams, params, strict=True)),
        "breaks": breaks,
    }


# backend[:kernel], graph breaks of the one-layer-each block.
CASES = {"local": 0, "local:math": 1, "allgather": 0, "ulysses": 0, "switch": 0, "ring": 1}


@pytest.mark.parametrize("backend", list(CASES))
def test_compiled_equals_eager(backend: str) -> None:
    expected = CASES[backend]
    backend, _, kernel = backend.partition(":")
    options = {"kernel": kernel} if kernel else None
    world = 1 if backend == "local" else 2
    results = run_distributed(_compiled_matches_eager, world, world, backend, options, expected == 0, timeout=600)
    for rank, errors in enumerate(results):
        breaks = errors.pop("breaks")
        assert max(errors.values()) < TOL, f"{backend} rank {rank}: {errors}"
        assert breaks == expected, f"{backend} {options}: {breaks} graph breaks, expected {expected}"


def _compiled_disagreement(world: int) -> tuple[str, str]:
    import torch._dynamo

    torch._dynamo.reset()
    ctx = mosaic.init(sp_size=world)
    layer = torch.compile(mosaic.MultiAxisAttention(16, 4, 1, backend="allgather"))
    x = ctx.shard(torch.randn(2, 8, 3, 16), 1)
    with pytest.raises(ValueError) as info:
        layer(x, kv_len=5 + ctx.sp_rank)
    # The next call, with the facts agreed, runs.
    assert layer(x, kv_len=5).shape == x.shape
    return type(info.value).__name__, str(info.value)


def test_a_compiled_layer_fails_together() -> None:
    """Facts that differ between ranks, met while tracing: every rank raises the eager error, not the compiler's."""
    results = run_distributed(_compiled_disagreement, 2, 2, timeout=600)
    assert results[0] == results[1], results
    assert "kv_len is [5, 6]" in results[0][1] and "MultiAxisAttention(attention_axis=1" in results[0][1], results[0]
