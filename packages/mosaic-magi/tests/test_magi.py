"""The ``magi`` backend on CPU: registration, lazy imports, options, and every reason it gives.

MagiAttention needs a Hopper GPU and is not on the package index, so these
tests run without it: ``installed`` pretends it is there (found and
importable), and each refusal must come with exactly its own sentence.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

import mosaic
from mosaic.layout import SeqLayout
from mosaic.problem import AttentionProblem
from mosaic.testing import run_distributed
from mosaic_magi import INSTALL_HINT, MagiBackend, MagiOptions, magi


def _problem(**changes) -> AttentionProblem:
    """A problem the engine accepts (bf16 on CUDA, 2 ranks, 16 positions each); ``changes`` break it."""
    facts = dict(
        batch=2,
        heads=4,
        kv_heads=4,
        head_dim=16,
        dtype=torch.bfloat16,
        device=torch.device("cuda", 0),
        q_layout=SeqLayout((16, 16)),
        kv_layout=SeqLayout((16, 16)),
        rank=0,
        causal=False,
        kv_len=None,
        scale=0.25,
        options=MagiOptions(),
        group=types.SimpleNamespace(),  # stands in for a process group: only its presence is checked
    )
    facts.update(changes)
    return AttentionProblem(**facts)


@pytest.fixture
def installed(monkeypatch):
    """MagiAttention present and importable, whatever this machine has; no GPU."""
    monkeypatch.setattr(magi, "find_spec", lambda name: ModuleSpec(name, None))
    monkeypatch.setattr(magi, "load_api", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MAGI_ATTENTION_HIERARCHICAL_COMM", raising=False)


def test_registered_under_its_name() -> None:
    mosaic.refresh_backends()
    assert "magi" in mosaic.installed_backends()
    assert "magi" not in mosaic.available_backends("cpu")  # it needs CUDA
    assert isinstance(mosaic.get_backend("magi"), MagiBackend)


def test_not_installed_says_where_it_comes_from(monkeypatch) -> None:
    monkeypatch.setattr(magi, "find_spec", lambda name: None)
    assert MagiBackend().not_supported_reasons(_problem()) == [INSTALL_HINT]
    assert "not on the package index" in INSTALL_HINT and "github.com/SandAI-org/MagiAttention" in INSTALL_HINT


ZIGZAG = SeqLayout((16, 16), "zigzag")
# (case, changes to the accepted problem, a phrase of the one expected reason or None for none)
REASONS = [
    ("accepted", {}, None),
    ("fp16", {"dtype": torch.float16}, None),
    ("gqa", {"kv_heads": 2}, None),
    ("mqa", {"kv_heads": 1}, None),
    ("kv_len", {"kv_len": 5}, None),
    ("causal", {"causal": True}, None),
    ("causal zigzag with kv_len", {"causal": True, "kv_len": 20, "q_layout": ZIGZAG, "kv_layout": ZIGZAG}, None),
    ("uneven", {"q_layout": SeqLayout((17, 16)), "kv_layout": SeqLayout((17, 16))}, None),
    ("empty shard", {"q_layout": SeqLayout((1, 0)), "kv_layout": SeqLayout((1, 0))}, None),
    ("one rank", {"q_layout": SeqLayout((16,)), "kv_layout": SeqLayout((16,))}, None),
    ("head dim 128", {"head_dim": 128}, None),
    ("cpu", {"device": torch.device("cpu")}, "device cpu not supported (supported: ['cuda'])"),
    ("fp32", {"dtype": torch.float32}, "dtype torch.float32 not supported"),
    ("fp64", {"dtype": torch.float64}, "dtype torch.float64 not supported"),
    ("head dim 136", {"head_dim": 136}, "head dim 136 > 128"),
    ("dropout", {"dropout": 0.1}, "attention dropout (0.1) not supported"),
    ("cross", {"cross": True, "kv_layout": SeqLayout((5, 5))}, "cross-attention"),
    ("no process group", {"group": None}, "needs torch.distributed initialised"),
    ("no positions", {"q_layout": SeqLayout((0, 0)), "kv_layout": SeqLayout((0, 0))}, "has no positions"),
    ("int32 ranges", {"batch": 2**20, "q_layout": SeqLayout((2**11, 2**11))}, "ranges are int32"),
]


@pytest.mark.parametrize(("changes", "phrase"), [c[1:] for c in REASONS], ids=[c[0] for c in REASONS])
def test_reasons(installed, changes, phrase) -> None:
    if "batch" in changes:  # keys follow the queries' layout (self-attention)
        changes = {**changes, "kv_layout": changes["q_layout"]}
    reasons = MagiBackend().not_supported_reasons(_problem(**changes))
    if phrase is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and phrase in reasons[0], reasons


def test_hierarchical_comm_is_refused(installed, monkeypatch) -> None:
    monkeypatch.setenv("MAGI_ATTENTION_HIERARCHICAL_COMM", "1")
    reasons = MagiBackend().not_supported_reasons(_problem())
    assert len(reasons) == 1 and "needs a 2-D device mesh" in reasons[0], reasons


def test_gpu_reasons(installed, monkeypatch) -> None:
    """Not Hopper: one reason; Hopper with a build that fails to import: that error, not a stack trace."""

    def broken():
        raise OSError("magi_attn_ext.so: undefined symbol")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert MagiBackend().not_supported_reasons(_problem()) == [
        "MagiAttention's FFA kernels need compute capability (9, 0) (Hopper, sm_90), the GPU has (8, 0)"
    ]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "the GPU has (10, 0)" in MagiBackend().not_supported_reasons(_problem())[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(magi, "load_api", broken)
    with pytest.raises(mosaic.BackendNotSupported, match=re.escape("failed to import (OSError: magi_attn_ext.so")):
        MagiBackend().check(_problem())


def test_reasons_add_up(installed) -> None:
    """Several problems at once: every one is listed."""
    reasons = MagiBackend().not_supported_reasons(
        _problem(device=torch.device("cpu"), dtype=torch.float32, head_dim=256, dropout=0.5, group=None)
    )
    assert len(reasons) == 5, reasons


def test_options() -> None:
    backend = MagiBackend()
    assert backend.parse_options({}) == MagiOptions(overlap_degree=1, atomic_forward=True)
    assert hash(backend.parse_options({"overlap_degree": None})) == hash(MagiOptions(None))
    for bad in ({"overlap_degree": 0}, {"overlap_degree": True}, {"overlap_degree": 1.5}, {"atomic_forward": 1}):
        with pytest.raises(ValueError, match=f"option {next(iter(bad))} must be"):
            backend.parse_options(bad)
    with pytest.raises(ValueError, match="has no option 'chunk_size'"):
        backend.parse_options({"chunk_size": 512})


def test_probing_and_planning_import_nothing(tmp_path: Path) -> None:
    """MagiAttention "installed" as a stub that fails on import: probing, planning, building a module only find it."""
    (tmp_path / "magi_attention").mkdir()
    (tmp_path / "magi_attention" / "__init__.py").write_text("raise ImportError('magi_attention was imported')\n")
    code = textwrap.dedent("""
        import sys, torch, mosaic, mosaic_magi
        from mosaic.testing import make_problem
        backend = mosaic.get_backend("magi")
        assert backend.environment_reasons() == [], backend.environment_reasons()
        problem = make_problem(size=2, backend="magi", kv_len=5)
        assert backend.not_supported_reasons(problem), "a CPU fp32 problem must be refused"
        plan = backend.plan(problem)
        assert plan.cost.flops > 0 and plan.mask.q_ranges
        mosaic.MultiAxisAttention(64, 2, 1, backend="magi")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "magi_attention")
        assert not loaded, loaded
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _forward_error() -> tuple[str, bool]:
    ctx = mosaic.init(sp_size=2)
    ctx.declare_sharded(1)
    attn = mosaic.MultiAxisAttention(16, 2, attention_axis=1, backend="magi")
    try:
        attn(torch.randn(2, 4, 3, 16))
    except mosaic.BackendNotSupported as exc:
        return str(exc), magi.is_installed()
    raise AssertionError("magi ran on CPU")


def test_forward_refuses_with_every_reason() -> None:
    """The module builds; its forward on CPU says why it can't run, on every rank alike."""
    for message, has_magi in run_distributed(_forward_error, 2):
        assert message.startswith("backend 'magi' can't run this attention because:")
        assert "device cpu not supported" in message
        assert "dtype torch.float32 not supported" in message
        assert "MagiAttention's cp group must use NCCL; the sp group uses gloo" in message
        assert (INSTALL_HINT in message) != has_magi
