"""The ``ring_flash_attn`` engine on CPU: registration, lazy imports, the reasons it gives, and its routing.

flash-attn needs CUDA, so the numeric test runs ring-flash-attn's own algorithm
modules (pure Python; skipped unless ring-flash-attn is installed) on gloo with
an emulated flash-attn kernel, against ``local`` on the unsharded tensor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from importlib.machinery import ModuleSpec
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import mosaic
from mosaic.layout import SeqLayout
from mosaic.problem import AttentionProblem
from mosaic.testing import compare_with_local, run_distributed
from mosaic_ring import RingFlashAttnBackend, flash_engine

INSTALL = "pip install 'mosaic-ring[flash]'"
ENGINE_MODULES = ("flash_attn", "ring_flash_attn", "_mosaic_ring_flash_attn")


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
        group=types.SimpleNamespace(),  # stands in for a process group: only its presence is checked
    )
    facts.update(changes)
    return AttentionProblem(**facts)


@pytest.fixture
def installed(monkeypatch):
    """Both packages present and importable, whatever this machine has."""
    monkeypatch.setattr(flash_engine, "find_spec", lambda name: ModuleSpec(name, None))
    monkeypatch.setattr(flash_engine, "load_engine", lambda: (None, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_registered_under_its_name() -> None:
    mosaic.refresh_backends()
    assert "ring_flash_attn" in mosaic.installed_backends()
    assert "ring_flash_attn" not in mosaic.available_backends("cpu")  # it needs CUDA
    assert isinstance(mosaic.get_backend("ring_flash_attn"), RingFlashAttnBackend)
    assert type(mosaic.get_backend("ring")).__name__ == "RingBackend"


def test_missing_packages_name_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(flash_engine, "find_spec", lambda name: None)
    assert RingFlashAttnBackend().not_supported_reasons(_problem()) == [
        f"ring-flash-attn is not installed: {INSTALL}",
        f"flash-attn is not installed: {INSTALL}",
    ]


ZIGZAG_2 = SeqLayout((16, 16), "zigzag")
ODD_CHUNKS = SeqLayout((9, 9), "zigzag")
# (case, changes to the accepted problem, a phrase of the one expected reason or None for none)
REASONS = [
    ("accepted", {}, None),
    ("gqa", {"kv_heads": 1}, None),
    ("causal zigzag", {"causal": True, "q_layout": ZIGZAG_2, "kv_layout": ZIGZAG_2}, None),
    ("fp16 causal", {"dtype": torch.float16, "causal": True, "q_layout": ZIGZAG_2, "kv_layout": ZIGZAG_2}, None),
    ("cross", {"cross": True, "kv_layout": SeqLayout((5, 5))}, None),
    ("one rank", {"q_layout": SeqLayout((16,)), "kv_layout": SeqLayout((16,))}, None),
    ("cpu", {"device": torch.device("cpu")}, "device cpu not supported (supported: ['cuda'])"),
    ("fp32", {"dtype": torch.float32}, "dtype torch.float32 not supported"),
    ("fp16 full", {"dtype": torch.float16}, "returns dQ rounded to bfloat16"),
    ("head dim 12", {"head_dim": 12}, "head dim 12 is not a multiple of 8"),
    ("head dim 264", {"head_dim": 264}, "head dim 264 > 256"),
    ("kv_len", {"kv_len": 8}, "kv_len not supported"),
    ("dropout", {"dropout": 0.1}, "attention dropout (0.1) not supported"),
    ("uneven", {"q_layout": SeqLayout((17, 16)), "kv_layout": SeqLayout((17, 16))}, "[17, 16] queries"),
    ("uneven cross", {"cross": True, "kv_layout": SeqLayout((5, 4))}, "[5, 4] keys"),
    ("causal contiguous", {"causal": True}, "causal=True needs layout='zigzag'"),
    # ODD_CHUNKS: 18 positions, equal shards (9 + 9) of unequal chunks (5, 5, 4, 4).
    ("causal odd chunks", {"causal": True, "q_layout": ODD_CHUNKS, "kv_layout": ODD_CHUNKS}, "not divisible by 4"),
    ("causal cross", {"causal": True, "cross": True, "q_layout": ZIGZAG_2, "kv_layout": ZIGZAG_2}, "causal cross"),
    ("no process group", {"group": None}, "needs torch.distributed initialised"),
]


@pytest.mark.parametrize(("changes", "phrase"), [c[1:] for c in REASONS], ids=[c[0] for c in REASONS])
def test_reasons(installed, changes, phrase) -> None:
    reasons = RingFlashAttnBackend().not_supported_reasons(_problem(**changes))
    if phrase is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and phrase in reasons[0], reasons


def test_broken_install_is_a_reason_not_a_stack_trace(monkeypatch) -> None:
    def broken():
        raise OSError("flash_attn_2_cuda.so: undefined symbol")

    monkeypatch.setattr(flash_engine, "find_spec", lambda name: ModuleSpec(name, None))
    monkeypatch.setattr(flash_engine, "load_engine", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(mosaic.BackendNotSupported, match=re.escape("failed to import (OSError: flash_attn_2_cuda.so")):
        RingFlashAttnBackend().check(_problem())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert RingFlashAttnBackend().not_supported_reasons(_problem()) == [
        "flash-attn 2 needs compute capability >= (8, 0), the GPU has (7, 5)"
    ]


def test_probing_imports_neither_package(tmp_path: Path) -> None:
    """With both packages "installed" (stubs that fail on import), probing must only find them."""
    for name in ("flash_attn", "ring_flash_attn"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    code = textwrap.dedent(f"""
        import sys, torch, mosaic, mosaic_ring
        from mosaic.layout import SeqLayout
        from mosaic.problem import AttentionProblem
        backend = mosaic.get_backend("ring_flash_attn")
        assert backend.environment_reasons() == [], backend.environment_reasons()
        layout = SeqLayout((8, 8))
        cpu = torch.device("cpu")
        problem = AttentionProblem(2, 4, 4, 16, torch.float32, cpu, layout, layout, 0, False, None, 0.25)
        assert backend.not_supported_reasons(problem), "a CPU fp32 problem must be refused"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ENGINE_MODULES!r})
        assert not loaded, loaded
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _forward_error() -> tuple[str, list[str]]:
    mosaic.init(sp_size=2).declare_sharded(1)
    attn = mosaic.MultiAxisAttention(16, 2, attention_axis=1, backend="ring_flash_attn")
    try:
        attn(torch.randn(2, 4, 3, 16))
    except mosaic.BackendNotSupported as exc:
        return str(exc), flash_engine.missing_packages()
    raise AssertionError("ring_flash_attn ran on CPU")


def test_forward_refuses_with_every_reason() -> None:
    """The module builds (the engine is installed as a plugin); its forward says why it can't run."""
    message, missing = run_distributed(_forward_error, 2)[0]
    assert message.startswith("backend 'ring_flash_attn' can't run this attention because:")
    assert "device cpu not supported" in message
    assert "dtype torch.float32 not supported" in message
    for dist in missing:
        assert f"{dist} is not installed: {INSTALL}" in message


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_layout_is_ring_flash_attn_convention(world: int) -> None:
    """ring-flash-attn's zigzag: 2P equal chunks, rank r holds chunk r then chunk 2P-1-r, in two equal halves."""
    chunk = 3
    x = torch.arange(2 * world * chunk)
    chunks = x.chunk(2 * world)
    layout = SeqLayout.even(x.numel(), world, "zigzag")
    for rank in range(world):
        mine = mosaic.layout.shard(x, 0, rank, world, "zigzag")
        assert torch.equal(mine, torch.cat([chunks[rank], chunks[2 * world - 1 - rank]]))
        first, second = mine.split(mine.numel() // 2)
        assert [(int(t[0]), int(t[-1]) + 1) for t in (first, second)] == list(layout.spans(rank))


# --- ring-flash-attn's algorithm code on gloo with an emulated flash-attn kernel ---------------------------------


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.double().repeat_interleave(groups, dim=2)


def _scores(q, k, scale, causal):
    """``(b, h, s_q, s_k)`` scores in fp64; flash-attn's causal mask is bottom-right aligned."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), _repeat(k, q.shape[2] // k.shape[2])) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq), float("-inf"))
    return s


def _flash_attn_forward(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    return_softmax,
):
    """flash-attn 2.8's ``_flash_attn_forward`` on ``(batch, seq, heads, head_dim)``: out, fp32 lse ``(b, h, s)``."""
    s = _scores(q, k, softmax_scale, causal)
    lse = s.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (s - lse[..., None]).exp(), _repeat(v, q.shape[2] // v.shape[2]))
    return out.to(q.dtype), lse.float(), None, None


def _flash_attn_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    """flash-attn 2.8's ``_flash_attn_backward``: writes dq, dk, dv (kv heads summed over their query heads)."""
    groups = q.shape[2] // k.shape[2]
    p = (_scores(q, k, softmax_scale, causal) - softmax_lse.double()[..., None]).exp()
    do = dout.double()
    delta = (do * out.double()).sum(-1).transpose(1, 2)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, _repeat(v, groups)) - delta[..., None]) * softmax_scale
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, _repeat(k, groups)))
    for grad, full in (
        (dk, torch.einsum("bhqk,bqhd->bkhd", ds, q.double())),
        (dv, torch.einsum("bhqk,bqhd->bkhd", p, do)),
    ):
        grad.copy_(full.unflatten(2, (k.shape[2], groups)).sum(3))
    return delta.float()


class _EmulatedBackend(RingFlashAttnBackend):
    """The engine with CPU and fp64 allowed, for the emulated kernel.

    Not fp32: ring-flash-attn starts its fp32 gradient accumulators with ``buffer.to(torch.float32)``, which
    aliases the kernel's output buffer when the input is fp32 already (flash-attn itself only takes fp16/bf16).
    """

    name = "ring_flash_attn_emulated"
    capabilities = replace(
        RingFlashAttnBackend.capabilities, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float64})
    )


# Embed 32 with 4 heads: head dim 8, as flash-attn needs. 24 positions split into 2P equal chunks for P <= 4.
EMULATED = [
    ("full axis1", (2, 24, 3, 32), 1, {}),
    ("full axis2", (2, 3, 24, 32), 2, {}),
    ("full zigzag layout", (2, 24, 3, 32), 1, {"layout": "zigzag"}),
    ("full gqa", (2, 24, 3, 32), 1, {"num_kv_heads": 2}),
    ("full cross", (2, 24, 3, 32), 1, {"kv_length": 12}),
    ("causal axis1", (2, 24, 3, 32), 1, {"causal": True, "layout": "zigzag"}),
    ("causal axis2", (2, 3, 24, 32), 2, {"causal": True, "layout": "zigzag"}),
    ("causal mqa", (2, 24, 3, 32), 1, {"causal": True, "layout": "zigzag", "num_kv_heads": 1}),
]


def _emulated_cases(world: int, batch_chunk: int | None) -> dict[str, dict[str, float]]:
    fake = types.ModuleType("flash_attn")
    fake.__spec__, fake.__path__ = ModuleSpec("flash_attn", None, is_package=True), []
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = _flash_attn_forward, _flash_attn_backward
    sys.modules.update({"flash_attn": fake, "flash_attn.flash_attn_interface": interface})
    chunk = flash_engine.CUDA_MAX_BATCH_HEADS
    flash_engine.CUDA_MAX_BATCH_HEADS = batch_chunk or chunk
    mosaic.register_backend(_EmulatedBackend.name, _EmulatedBackend)
    try:
        mosaic.init(sp_size=world)
        errors = {
            name: compare_with_local(_EmulatedBackend.name, shape, axis, dtype=torch.float64, **kw)
            for name, shape, axis, kw in EMULATED
        }
        # ring-flash-attn's own __init__ (its transformers adapter) never ran.
        assert "ring_flash_attn" not in sys.modules
        return errors
    finally:
        # The workers are shared with other tests: leave no fake flash-attn behind.
        mosaic.unregister_backend(_EmulatedBackend.name)
        flash_engine.CUDA_MAX_BATCH_HEADS = chunk
        flash_engine.load_engine.cache_clear()
        for name in [m for m in sys.modules if m.split(".")[0] in ENGINE_MODULES]:
            del sys.modules[name]


@pytest.mark.skipif(
    find_spec("ring_flash_attn") is None,
    reason="ring-flash-attn is not installed (pure Python: pip install --no-deps ring-flash-attn runs this on CPU)",
)
# Not one rank: ring-flash-attn then sends dK/dV to itself, which NCCL does and gloo can't.
@pytest.mark.parametrize(("world", "batch_chunk"), [(2, None), (3, 4), (4, None)])
def test_emulated_engine_matches_local(world: int, batch_chunk: int | None) -> None:
    """Outputs and gradients through ring-flash-attn's own ring and zigzag code match ``local``.

    ``batch_chunk`` runs the ring on slices of the batch, as for more than 65535 rows on CUDA.
    ring_flash_attn_func (full attention) returns dQ cast to bfloat16 whatever the input dtype, so there the
    input and parameter gradients carry bf16 rounding (2^-8 relative); everything else matches to the fp32 of
    flash-attn's log-sum-exp and ring-flash-attn's accumulators.
    """
    results = run_distributed(_emulated_cases, world, world, batch_chunk)
    for rank, per_case in enumerate(results):
        for name, errors in per_case.items():
            rounded = {"dx", "params"} if name.startswith("full") else set()
            for key, error in errors.items():
                tol = 2.0**-8 if key in rounded else 1e-5
                assert error < tol, f"P={world} rank {rank} {name} {key}: {error} (all: {errors})"
