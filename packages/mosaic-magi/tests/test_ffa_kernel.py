"""The ``ffa`` kernel on CPU: registration, reasons, and its packing against a stand-in for FFA.

MagiAttention runs only on Hopper GPUs (tests/gpu/check_magi.py and the GPU run of
mosaic-core's test_kernels.py test the real kernel against exact arithmetic). Here a
stand-in computes what FFA's two functions compute, in fp64 from q/k ranges, so what
this package adds — packing, head-dim padding, ranges, the lse layout, unpacking —
is checked against Mosaic's math kernel.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import mosaic
from mosaic import kernels
from mosaic.kernels import BlockSpec
from mosaic_magi import INSTALL_HINT, FfaKernel, ffa


def _scores(q, k, qa, qb, ka, kb, causal, scale):
    s = torch.einsum("qhd,khd->hqk", q[qa:qb].double(), k[ka:kb].double()) * scale
    if causal:
        s = s.masked_fill(torch.ones(qb - qa, kb - ka, dtype=torch.bool).triu(1), -math.inf)
    return s


def _blocks(q_ranges, k_ranges, types_):
    return zip(q_ranges.tolist(), k_ranges.tolist(), types_.tolist(), strict=True)


def _forward(*, q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, out_type, **_):
    out = torch.zeros(q.shape, dtype=out_type)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32)
    for (qa, qb), (ka, kb), kind in _blocks(q_ranges, k_ranges, attn_type_map):
        s = _scores(q, k, qa, qb, ka, kb, kind == 1, softmax_scale)
        lse[qa:qb] = s.logsumexp(-1).T.float()
        out[qa:qb] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[ka:kb].double()).to(out_type)
    return out, types.SimpleNamespace(lse=lse)


def _backward(*, dout, q, k, v, out, lse, q_ranges, k_ranges, attn_type_map, softmax_scale, dq_type, **_):
    """Gradients from the given ``out`` and ``lse`` (as FFA's backward: no recomputed normaliser)."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=dq_type) for t in (q, k, v))
    do = dout.double()
    for (qa, qb), (ka, kb), kind in _blocks(q_ranges, k_ranges, attn_type_map):
        s = _scores(q, k, qa, qb, ka, kb, kind == 1, softmax_scale)
        p = torch.exp(s - lse[qa:qb].T.double().unsqueeze(-1))
        dv[ka:kb] += torch.einsum("hqk,qhd->khd", p, do[qa:qb]).to(dq_type)
        dp = torch.einsum("qhd,khd->hqk", do[qa:qb], v[ka:kb].double())
        delta = (do[qa:qb] * out[qa:qb].double()).sum(-1).T.unsqueeze(-1)
        ds = p * (dp - delta) * softmax_scale
        dq[qa:qb] += torch.einsum("hqk,khd->qhd", ds, k[ka:kb].double()).to(dq_type)
        dk[ka:kb] += torch.einsum("hqk,qhd->khd", ds, q[qa:qb].double()).to(dq_type)
    return dq, dk, dv, None


@pytest.fixture
def stand_in(monkeypatch):
    module = types.SimpleNamespace(_flex_flash_attn_forward=_forward, _flex_flash_attn_backward=_backward)
    monkeypatch.setattr(ffa, "_ffa", lambda: module)


def test_registered_by_entry_point_and_never_picked_unnamed():
    assert "ffa" in kernels.kernel_names()
    kernel = kernels.get_kernel("ffa")
    assert isinstance(kernel, FfaKernel) and not kernel.automatic
    assert list(kernels.KERNELS)[-1] == "math"  # plugins join before the fallback


def test_reasons(monkeypatch):
    q = torch.empty(1, 2, 4, 24, dtype=torch.bfloat16)
    monkeypatch.setattr(ffa, "is_installed", lambda: False)
    reasons = FfaKernel().reasons(BlockSpec.of(q))
    assert "needs a cuda device, got cpu" in reasons and INSTALL_HINT in reasons
    assert "dtype torch.float32 not in" in " ".join(FfaKernel().reasons(BlockSpec.of(q.float())))
    long_heads = torch.empty(1, 1, 1, 160, dtype=torch.bfloat16)
    assert "head dim 160 > 128" in FfaKernel().reasons(BlockSpec.of(long_heads))


def test_named_on_cpu_fails_with_its_reasons():
    attn = mosaic.MultiAxisAttention(48, 2, 1, backend_options={"kernel": "ffa"})
    with pytest.raises(RuntimeError, match="kernel='ffa' can't run this input: needs a cuda device"):
        attn(torch.randn(1, 8, 2, 48))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [24, 64, 100])
def test_packing_against_math(stand_in, causal, head_dim):
    torch.manual_seed(0)
    b, h, n = 3, 2, 11
    s = n if causal else 7  # Mosaic asks causal only of square blocks
    q = torch.randn(b, h, n, head_dim)
    k, v = torch.randn(b, h, s, head_dim), torch.randn(b, h, s, head_dim)
    dout = torch.randn(b, h, n, head_dim)
    scale = 0.3
    out, lse, aux = FfaKernel().forward(q, k, v, causal, scale)
    ref_out, ref_lse, _ = kernels.MathKernel().forward(q, k, v, causal, scale)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    grads = FfaKernel().backward(dout, q, k, v, out, lse, aux, causal, scale)
    ref = kernels.MathKernel().backward(dout, q, k, v, ref_out, ref_lse, None, causal, scale)
    for got, want in zip(grads, ref, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rows_in_memory_order_are_packed_without_a_copy():
    rows = torch.randn(2, 5, 3, 64)  # (batch', rows, heads, 64): FFA's packed order already
    q = rows.transpose(1, 2)
    assert ffa._pack(q, 64).data_ptr() == rows.data_ptr()
    assert ffa._pack(q.contiguous(), 64).data_ptr() != q.contiguous().data_ptr()
    padded = ffa._pack(torch.randn(2, 3, 5, 24), 64)
    assert padded.shape == (10, 3, 64) and not padded[..., 24:].any()


def test_through_local_with_the_stand_in(stand_in, monkeypatch):
    """``local`` with ``kernel="ffa"``: forward and gradients equal to the default kernel's (the reasons are
    the GPU's; here they are lifted)."""
    monkeypatch.setattr(FfaKernel, "reasons", lambda self, q, k=None: [])
    torch.manual_seed(1)
    attn = mosaic.MultiAxisAttention(48, 2, 1, backend_options={"kernel": "ffa"})
    ref = mosaic.MultiAxisAttention(48, 2, 1)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 9, 3, 48, requires_grad=True)
    y = attn(x, kv_len=4)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    x.grad = None
    y_ref = ref(x, kv_len=4)
    (y_ref * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, [x.grad] + [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
