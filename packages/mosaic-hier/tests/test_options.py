"""Settings, their checks and the module, without a process group (one-process world at most)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mosaic
from mosaic.problem import AttentionProblem
from mosaic.testing import make_problem, reference_attention
from mosaic_hier import HierarchicalAttention, HierarchicalBackend, HierOptions
from mosaic_hier.options import local_world_mismatch, option_reasons, warn_local_world


def _problem(size: int, options: dict, heads: int = 4) -> AttentionProblem:
    return make_problem(
        size=size, heads=heads, length=3 * size, head_dim=4, scale=0.5, options=HierOptions(**options), context=None,
    )  # fmt: skip


def test_option_reasons_name_the_values() -> None:
    assert option_reasons({"intra_node_size": 2}) == []
    assert "intra_node_size" in option_reasons({})[0]
    assert "0" in option_reasons({"intra_node_size": 0})[0]
    assert "True" in option_reasons({"intra_node_size": True})[0]
    reasons = option_reasons({"intra_node_size": 2, "inter_node_strategy": "ulysses", "intra_node_strategy": "mesh"})
    assert len(reasons) == 2 and "'ulysses'" in reasons[0] and "'mesh'" in reasons[1]
    assert "'nodes'" in option_reasons({"intra_node_size": 2, "nodes": 2})[0]


def test_module_is_the_backend_with_options() -> None:
    torch.manual_seed(0)
    hier = HierarchicalAttention(2, "allgather", "ring", embed_dim=16, num_heads=4, attention_axis=1, num_kv_heads=2)
    assert hier.backend_name == "hierarchical" and isinstance(hier.backend, HierarchicalBackend)
    assert hier.backend_options == {
        "intra_node_size": 2,
        "inter_node_strategy": "allgather",
        "intra_node_strategy": "ring",
    }
    assert "intra_node_size=2" in repr(hier)
    plain = HierarchicalAttention(2, embed_dim=16, num_heads=4, attention_axis=1)
    assert plain.backend_options == HierOptions(2, "ring", "allgather").as_dict()
    # No projection code of its own: the parameters of nn.MultiheadAttention.
    assert set(plain.state_dict()) == set(nn.MultiheadAttention(16, 4).state_dict())
    assert mosaic.HierarchicalAttention is HierarchicalAttention


def test_module_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="inter_node_strategy 'mesh2d'"):
        HierarchicalAttention(2, "mesh2d", embed_dim=16, num_heads=4, attention_axis=1)
    with pytest.raises(ValueError, match="intra_node_size must be a positive int, got -1"):
        HierarchicalAttention(-1, embed_dim=16, num_heads=4, attention_axis=1)
    with pytest.raises(ValueError, match=r"backend 'hierarchical' needs option\(s\) intra_node_size"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="hierarchical")
    with pytest.raises(ValueError, match=r"has no option 'nodes' \(its options: intra_node_size, inter_node_strategy"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="hierarchical", backend_options={"intra_node_size": 2, "nodes": 2})


def test_intra_node_size_must_divide_the_sp_group() -> None:
    reasons = HierarchicalBackend().not_supported_reasons(_problem(4, {"intra_node_size": 3}))
    assert len(reasons) == 1 and "intra_node_size=3" in reasons[0] and "size 4" in reasons[0]
    assert HierarchicalBackend().not_supported_reasons(_problem(4, {"intra_node_size": 2})) == []


def test_ulysses_without_mosaic_compose_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSAIC_BACKEND_AUTOLOAD", "0")
    mosaic.refresh_backends()
    try:
        options = {"intra_node_size": 2, "intra_node_strategy": "ulysses"}
        reasons = HierarchicalBackend().not_supported_reasons(_problem(4, options))
    finally:
        monkeypatch.delenv("MOSAIC_BACKEND_AUTOLOAD")
        mosaic.refresh_backends()
    assert len(reasons) == 1 and "'composed'" in reasons[0] and "pip install mosaic-compose" in reasons[0]


def test_local_world_size() -> None:
    assert local_world_mismatch(4, {}) is None
    assert local_world_mismatch(4, {"LOCAL_WORLD_SIZE": "4"}) is None
    assert "2 simulated nodes" in local_world_mismatch(2, {"LOCAL_WORLD_SIZE": "4"})
    assert "span two hosts" in local_world_mismatch(3, {"LOCAL_WORLD_SIZE": "4"})
    assert "span two hosts" in local_world_mismatch(8, {"LOCAL_WORLD_SIZE": "4"})
    with pytest.warns(UserWarning, match="intra_node_size=8 does not divide LOCAL_WORLD_SIZE=4"):
        warn_local_world(8, "4")


def test_one_process_world_matches_local() -> None:
    mosaic.init()
    try:
        torch.manual_seed(0)
        module = HierarchicalAttention(1, embed_dim=16, num_heads=4, attention_axis=1)
        x = torch.randn(2, 7, 3, 16)
        want = reference_attention(module, x, kv_len=5, causal=True)
        torch.testing.assert_close(module(x, kv_len=5, causal=True), want, atol=1e-6, rtol=1e-6)
    finally:
        mosaic.shutdown()
