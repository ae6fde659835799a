"""The ``fa4`` kernel without a GPU: registration, reasons, the API check, and its layout against a stand-in.

FlashAttention-4 runs only on Hopper/Blackwell GPUs (test_kernels.py and tests/gpu run the
real kernel there against exact arithmetic). Here a stand-in computes, in fp64, what FA4's two
entry points compute on its ``(batch, rows, heads, head_dim)`` layout, so what Mosaic adds —
the transposes (views, no copies), grouped K/V heads passed as they are, head-dim padding, the
lse, a backward against a merged ``(out, lse)`` — is checked against the math kernel.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import tomllib
import torch

import mosaic
from mosaic import kernels
from mosaic.kernels import BlockSpec, Fa4Kernel, fa4


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def _scores(q, k, causal, scale):
    s = torch.einsum("blhd,bshd->bhls", q.double(), _expand(k, q.shape[2]).double()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return s


SEEN: list[torch.Tensor] = []


def _fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False, **_):
    SEEN.extend((q, k, v))
    s = _scores(q, k, causal, softmax_scale)
    lse = s.logsumexp(-1)
    out = torch.einsum("bhls,bshd->blhd", s.softmax(-1), _expand(v, q.shape[2]).double())
    # FA4 allocates out as (b, n, h, d); its lse is fp32 (here in the inputs' fp64, for exact comparisons)
    return out.to(q.dtype).contiguous(), lse, None, None, None


def _bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, **_):
    """Gradients from the given ``out`` and ``lse`` (FA4's backward recomputes no normaliser)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    s = _scores(q, k, causal, softmax_scale)
    p = torch.exp(s - lse.double().unsqueeze(-1))
    do = dout.double()
    dv = torch.einsum("bhls,blhd->bshd", p, do)
    dp = torch.einsum("blhd,bshd->bhls", do, _expand(v, heads).double())
    delta = (do * out.double()).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = p * (dp - delta) * softmax_scale
    dq = torch.einsum("bhls,bshd->blhd", ds, _expand(k, heads).double())
    dk = torch.einsum("bhls,blhd->bshd", ds, q.double())

    def grouped(g):  # FA4 sums the gradients of a K/V head's query group itself
        b, n, _, d = g.shape
        return g.view(b, n, kv_heads, heads // kv_heads, d).sum(3)

    return dq.to(q.dtype), grouped(dk).to(k.dtype), grouped(dv).to(v.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    SEEN.clear()
    module = types.SimpleNamespace(__name__="flash_attn.cute.interface", _flash_attn_fwd=_fwd, _flash_attn_bwd=_bwd)
    monkeypatch.setattr(fa4, "interface", lambda: module)
    return module


def test_registered_before_cudnn_and_absent_here():
    names = kernels.kernel_names()
    assert names.index("tiny") < names.index("fa4") < names.index("cudnn")
    spec = BlockSpec(torch.device("cpu"), torch.bfloat16, 24, 100, 50, 4, 4)
    reasons = Fa4Kernel().reasons(spec)
    assert "needs a cuda device, got cpu" in reasons
    if fa4.installed_version() is None:
        assert 'flash-attn-4 is not installed (pip install "mosaic-core[fa4]")' in reasons
    assert kernels.choose_kernel(spec).name == "cpu_flash"
    with pytest.raises(RuntimeError, match="kernel='fa4' can't run this input: needs a cuda device"):
        kernels.choose_kernel(spec, "fa4")


def test_an_untested_version_is_a_reason(monkeypatch):
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.0b99")
    reasons = " ".join(Fa4Kernel().unavailable(torch.device("cuda")))
    assert "flash-attn-4 4.0.0b99 is installed" in reasons and fa4.TESTED_VERSIONS[0] in reasons


def test_the_extra_pins_the_tested_version():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["fa4"]
    assert any(req.startswith("flash-attn-4") and f"=={fa4.TESTED_VERSIONS[0]}" in req for req in extra), extra


def test_an_api_change_names_the_function():
    def old_fwd(q, k, v, softmax_scale=None, causal=False): ...

    changed = types.SimpleNamespace(__name__="flash_attn.cute.interface", _flash_attn_fwd=old_fwd, _flash_attn_bwd=_bwd)
    with pytest.raises(RuntimeError, match=r"changed flash_attn\.cute\.interface\._flash_attn_fwd: .*return_lse"):
        fa4.check_api(changed)
    gone = types.SimpleNamespace(__name__="flash_attn.cute.interface", _flash_attn_fwd=_fwd)
    with pytest.raises(RuntimeError, match=r"has no flash_attn\.cute\.interface\._flash_attn_bwd"):
        fa4.check_api(gone)
    fa4.check_api(types.SimpleNamespace(__name__="x", _flash_attn_fwd=_fwd, _flash_attn_bwd=_bwd))


def _packed(b, n, heads, kv_heads, d, dtype):
    """q, k, v as views of one packed projection ``(b, n, heads + 2 kv_heads, d)``, as MultiAxisAttention makes them."""
    qkv = torch.randn(b, n, heads + 2 * kv_heads, d, dtype=dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 24), (4, 2, 24), (6, 1, 20)])
def test_layout_against_math(stand_in, causal, heads, kv_heads, head_dim):
    torch.manual_seed(0)
    kernel, dtype = Fa4Kernel(), torch.float64
    q, k, v = _packed(3, 11, heads, kv_heads, head_dim, dtype)
    out, lse, call = kernels.attention_forward(q, k, v, causal=causal, kernel=kernel)
    want_out, want_lse, want_call = kernels.attention_forward(q, k, v, causal=causal, kernel="math")
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    if head_dim % 8 == 0:  # strided views go in as they are: FA4's (b, n, h, d) is the projection's memory
        assert all(t.data_ptr() == s.data_ptr() and t.stride() == s.transpose(1, 2).stride()
                   for t, s in zip(SEEN[:3], (q, k, v), strict=True))  # fmt: skip
        assert all(t.shape[2] == n for t, n in zip(SEEN[:3], (heads, kv_heads, kv_heads), strict=True))
        assert out.transpose(1, 2).is_contiguous()  # out in (b, n, h, d) order: the output projection's view
    else:  # padded to a multiple of 8 in one copy
        assert SEEN[0].shape[-1] == 24
    dout = torch.randn(3, 11, heads, head_dim, dtype=dtype).transpose(1, 2)
    got = kernels.attention_backward(dout, q, k, v, out, lse, call, causal=causal)
    want = kernels.attention_backward(dout, q, k, v, want_out, want_lse, want_call, causal=causal)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.to(w.dtype), w)


def test_backward_against_a_merged_result(stand_in):
    """Two key blocks merged (as a ring merges them), each block's backward against the merged ``(out, lse)``."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=torch.float64) for _ in range(3))
    k2, v2 = torch.randn(2, 4, 7, 16, dtype=torch.float64), torch.randn(2, 4, 7, 16, dtype=torch.float64)
    dout = torch.randn_like(q)
    parts = [kernels.attention_forward(q, a, b, kernel=Fa4Kernel()) for a, b in ((k, v), (k2, v2))]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o * torch.exp(part_lse - lse).unsqueeze(-1) for o, part_lse, _ in parts)
    grads = [kernels.attention_backward(dout, q, a, b, out, lse, c) for (a, b), (_, _, c) in
             zip(((k, v), (k2, v2)), parts, strict=True)]  # fmt: skip
    whole = [torch.cat(t, 2).requires_grad_() for t in ((k, k2), (v, v2))]
    qr = q.clone().requires_grad_()
    ref = torch.softmax(qr @ whole[0].transpose(-1, -2) / 4, -1) @ whole[1]
    torch.testing.assert_close(out, ref.detach())
    ref.backward(dout)
    torch.testing.assert_close(grads[0][0] + grads[1][0], qr.grad)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 2), whole[0].grad)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 2), whole[1].grad)


def test_local_names_it_and_explain_lists_it():
    with pytest.raises(RuntimeError, match="kernel='fa4' can't run this input"):
        mosaic.MultiAxisAttention(48, 2, 1, backend_options={"kernel": "fa4"})(torch.randn(1, 8, 2, 48))
    ranking = dict(kernels.ranking(BlockSpec(torch.device("cpu"), torch.float32, 24, 8, 8)))
    assert ranking["cpu_flash"].startswith("chosen") and "needs a cuda device" in ranking["fa4"]


@pytest.mark.skipif(
    not torch.cuda.is_available() or fa4.installed_version() is None, reason="needs CUDA and flash-attn-4 installed"
)
def test_the_installed_fa4_loads_and_keeps_the_api_mosaic_calls():
    """On a GPU machine with flash-attn-4: a changed entry point fails here, naming the function."""
    assert fa4.installed_version() in fa4.TESTED_VERSIONS
    fa4.check_api(fa4.interface())
    if torch.cuda.get_device_capability()[0] in (9, 10, 11):
        assert Fa4Kernel().unavailable(torch.device("cuda")) == []
        spec = BlockSpec(torch.device("cuda"), torch.bfloat16, 24, 150_000, 75_000, 4, 4, 11)
        assert kernels.choose_kernel(spec).name == "fa4"
