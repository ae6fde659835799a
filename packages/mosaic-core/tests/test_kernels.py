"""Block kernels against exact fp64 arithmetic: forward (out, lse), merged backward, chunking, padding."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic import blockwise, kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Max error relative to the reference's scale, per input dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _runnable(device: str, dtype: torch.dtype) -> list[str]:
    probe = torch.empty(1, 1, 1, 8, device=device, dtype=dtype)
    return [name for name, reasons in kernels.kernel_reasons(probe).items() if not reasons]


def _cases():
    for device in DEVICES:
        dtypes = [torch.float64, torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        for dtype in dtypes:
            for name in _runnable(device, dtype):
                yield pytest.param(device, dtype, name, id=f"{device}-{str(dtype)[6:]}-{name}")


def _reference(q, k, v, causal, kv_rows=None):
    """Exact attention in fp64 with autograd: out, lse."""
    q, k, v = (t.double() for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.softmax(scores, -1) @ v, lse


def _err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1)).item()


@pytest.fixture
def forced(monkeypatch):
    def force(name):
        monkeypatch.setenv("MOSAIC_KERNEL", name)

    return force


@pytest.mark.parametrize("device,dtype,name", list(_cases()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,kv_heads", [(16, 4), (12, 2), (24, 1)])
def test_forward_matches_exact(device, dtype, name, causal, head_dim, kv_heads, forced):
    forced(name)
    torch.manual_seed(0)
    q = torch.randn(3, 4, 33, head_dim, device=device, dtype=dtype)
    k = torch.randn(3, kv_heads, 33, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    out, lse, call = kernels.attention_forward(q, k, v, causal=causal)
    ref_out, ref_lse = _reference(q, k, v, causal)
    assert call.kernel == name
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == kernels.lse_dtype(dtype)
    assert _err(out, ref_out) < TOL[dtype]
    assert _err(lse, ref_lse) < TOL[dtype]


@pytest.mark.parametrize("device,dtype,name", list(_cases()))
def test_backward_of_merged_blocks(device, dtype, name, forced):
    """Two key blocks merged by lse, each backward with the final out/lse == backward of the whole."""
    forced(name)
    torch.manual_seed(1)
    q = torch.randn(2, 4, 40, 16, device=device, dtype=dtype)
    k = torch.randn(2, 2, 56, 16, device=device, dtype=dtype)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    split = 23
    out, lse = blockwise.empty_partial(q)
    calls = []
    for rows in (slice(0, split), slice(split, None)):
        block_out, block_lse, call = kernels.attention_forward(q, k[:, :, rows], v[:, :, rows])
        blockwise.merge_(out, lse, block_out, block_lse)
        calls.append(call)
    out = out.to(dtype)
    grads = [
        kernels.attention_backward(dout, q, k[:, :, r], v[:, :, r], out, lse, c)
        for r, c in zip((slice(0, split), slice(split, None)), calls, strict=True)
    ]
    dq = sum(g[0].double() for g in grads)
    dk = torch.cat([g[1] for g in grads], 2)
    dv = torch.cat([g[2] for g in grads], 2)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = _reference(qr, kr, vr, False)
    ref_out.backward(dout.double())
    assert _err(out, ref_out) < TOL[dtype]
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert _err(got, want) < 2 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_chunking_gives_same_result(device, monkeypatch):
    torch.manual_seed(2)
    dtype = torch.float32
    q = torch.randn(7, 2, 9, 8, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    dout = torch.randn_like(q)
    whole = kernels.attention_forward(q, k, v, causal=True)
    grads_whole = kernels.attention_backward(dout, q, k, v, whole[0], whole[1], whole[2], causal=True)
    monkeypatch.setattr(kernels.contract, "CUDA_MAX_BATCH_HEADS", 6)  # 3 batch rows per CUDA launch
    monkeypatch.setattr(kernels.exact, "_MAX_SCORES", 3 * 2 * 9 * 9)
    monkeypatch.setattr(kernels.CpuFlashKernel, "max_batch", lambda self, h, lq, lk: 3)
    chunked = kernels.attention_forward(q, k, v, causal=True)
    assert len(chunked[2].aux) == 3
    grads = kernels.attention_backward(dout, q, k, v, chunked[0], chunked[1], chunked[2], causal=True)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    for a, b in zip(grads, grads_whole, strict=True):
        torch.testing.assert_close(a, b)


def test_empty_keys_give_zero_and_minus_inf():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 0, 8)
    out, lse, call = kernels.attention_forward(q, k, k)
    assert call is None
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


def test_merge_with_no_keys_is_nan_free():
    out, lse = blockwise.empty_partial(torch.empty(1, 2, 4, 8))
    empty_out, empty_lse = blockwise.empty_partial(torch.empty(1, 2, 4, 8))
    blockwise.merge_(out, lse, empty_out, empty_lse)
    assert not out.isnan().any() and torch.isneginf(lse).all()
    block = torch.randn(1, 2, 4, 8)
    block_lse = torch.randn(1, 2, 4)
    blockwise.merge_(out, lse, block, block_lse)
    torch.testing.assert_close(out, block)
    torch.testing.assert_close(lse, block_lse)


def test_a_forced_kernel_runs_the_blocks_it_can_and_leaves_the_others(forced):
    forced("math")
    assert kernels.attention_forward(*(torch.randn(1, 1, 4, 8) for _ in range(3)))[2].kernel == "math"
    forced("flash")  # no CUDA here: the automatic choice runs the block
    assert kernels.attention_forward(*(torch.randn(1, 1, 4, 8) for _ in range(3)))[2].kernel == "cpu_flash"
    with pytest.raises(RuntimeError, match="kernel='flash' can't run"):
        kernels.attention_forward(*(torch.randn(1, 1, 4, 8) for _ in range(3)), kernel="flash")
    forced("nope")
    with pytest.raises(ValueError, match="not one of"):
        kernels.attention_forward(*(torch.randn(1, 1, 4, 8) for _ in range(3)))


@pytest.mark.parametrize("device,dtype,name", [c for c in _cases() if c.values[1] != torch.float64])
def test_strided_views_match_contiguous(device, dtype, name, forced):
    """Projection views in, ``dout`` in ``out``'s order or not: the same results as contiguous inputs."""
    forced(name)
    torch.manual_seed(3)
    b, n, h, d = 3, 40, 4, 24
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype)  # a packed projection's output
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, n, d) views, rows strided by 3 h d
    dense = [t.contiguous() for t in (q, k, v)]
    dout_rows = torch.randn(b, n, h, d, device=device, dtype=dtype)  # the output projection's gradient
    want_out, want_lse, call = kernels.attention_forward(*dense)
    got_out, got_lse, got_call = kernels.attention_forward(q, k, v)
    assert got_call.kernel == name
    assert _err(got_out, want_out) < TOL[dtype] and _err(got_lse, want_lse) < TOL[dtype]
    want = kernels.attention_backward(dout_rows.transpose(1, 2).contiguous(), *dense, want_out, want_lse, call)
    for dout in (dout_rows.transpose(1, 2), dout_rows.transpose(1, 2).contiguous()):
        got = kernels.attention_backward(dout, q, k, v, got_out, got_lse, got_call)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and _err(g, w) < 2 * TOL[dtype]


def test_named_kernel_and_local_option(forced):
    """``kernel=`` names a kernel per call; ``local``'s option checks the name when a module is built."""
    import mosaic

    q = torch.randn(1, 2, 6, 8)
    assert kernels.attention_forward(q, q, q, kernel="math")[2].kernel == "math"
    forced("cpu_flash")  # an explicit name wins over MOSAIC_KERNEL
    assert kernels.attention_forward(q, q, q, kernel="math")[2].kernel == "math"
    with pytest.raises(RuntimeError, match="kernel='cudnn' can't run this input: needs a cuda device"):
        kernels.attention_forward(q, q, q, kernel="cudnn")
    with pytest.raises(ValueError, match="is not one of"):
        mosaic.MultiAxisAttention(8, 2, 1, backend_options={"kernel": "nope"})
    attn = mosaic.MultiAxisAttention(8, 2, 1, backend_options={"kernel": "math"})
    x = torch.randn(2, 7, 3, 8)
    ref = mosaic.MultiAxisAttention(8, 2, 1)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x, kv_len=3), ref(x, kv_len=3), rtol=1e-5, atol=1e-6)
    dropping = mosaic.MultiAxisAttention(8, 2, 1, dropout=0.1, backend_options={"kernel": "math"})
    with pytest.raises(ValueError, match="kernel='math' can't apply attention dropout"):
        dropping(x)
    dropping.eval()  # no dropout: the named kernel runs
    ref.load_state_dict(dropping.state_dict())
    torch.testing.assert_close(dropping(x), ref(x), rtol=1e-5, atol=1e-6)
