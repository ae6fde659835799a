"""The tiny-sequence Triton kernel against exact fp64 arithmetic, and its place in the kernel registry.

Each accuracy check asks for an error no worse than that of the kernel the
tiny one replaces on the same input: cuDNN on CUDA, the exact fp32 math kernel
under Triton's CPU interpreter. The interpreter's fp32 -> bf16 conversions
truncate instead of rounding (Triton 3.9), so its bf16 bound allows one more
ulp.
"""

from __future__ import annotations

import math

import pytest
import torch

from mosaic import blockwise, kernels
from mosaic.kernels import BlockSpec, tiny


def _device() -> str | None:
    if not tiny.triton_importable():
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if tiny.interpreted() else None


DEVICE = _device()
needs_triton = pytest.mark.skipif(DEVICE is None, reason="needs CUDA or triton with TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA and triton")
DTYPES = [torch.bfloat16, torch.float16]
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture
def forced(monkeypatch):
    def force(name):
        monkeypatch.setenv("MOSAIC_KERNEL", name)

    force("tiny")
    return force


def _baseline(q_len: int, k_len: int, causal: bool = False) -> str:
    """The kernel whose error the tiny kernel must match.

    Mosaic asks the fused kernels for causal masks on square blocks only, and
    cuDNN rejects one query against one key (torch 2.11, cuDNN 9.19): those
    are checked against the exact math kernel.
    """
    if DEVICE == "cuda" and not (causal and q_len != k_len) and (q_len, k_len) != (1, 1):
        probe = torch.empty(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
        return next(
            name for name in ("cudnn", "flash", "math") if not kernels.KERNELS[name].reasons(BlockSpec.of(probe))
        )
    return "math"


def _allowed(baseline_err: float, dtype: torch.dtype) -> float:
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        return 2 * baseline_err + 2**-7  # truncation may add up to one bf16 ulp of the output's scale
    return 1.25 * baseline_err + FLOOR[dtype]


def _err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1)).item()


def _visible(q_pos, k_pos, causal):
    q_pos, k_pos = torch.as_tensor(q_pos), torch.as_tensor(k_pos)
    if not causal:
        return torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    return k_pos[None, :] <= q_pos[:, None]


def _reference(q, k, v, mask):
    """fp64 attention with autograd under a visibility mask; rows with no key give 0."""
    q, k, v = (t.double() for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    mask = mask.to(q.device)
    has_key = mask.any(-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~(mask | ~has_key), float("-inf"))
    lse = scores.logsumexp(-1).masked_fill(~has_key[..., 0], float("-inf"))
    return (torch.softmax(scores, -1) * has_key) @ v, lse


def _inputs(shape_q, shape_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    k = torch.randn(shape_k, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    v = torch.randn(shape_k, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    dout = torch.randn(shape_q, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    return q, k, v, dout


def _kernel_errors(q, k, v, dout, causal, want):
    """Errors of the selected kernel's (out, dq, dk, dv) and its lse against the fp64 ``want``."""
    out, lse, call = kernels.attention_forward(q, k, v, causal=causal)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, call, causal=causal)
    ref_out, ref_lse, ref_grads = want
    errors = [_err(out, ref_out)] + [_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    return call.kernel, errors, _err(lse, ref_lse)


def _fp64_grads(q, k, v, dout, mask):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = _reference(*leaves, mask)
    out.backward(dout.double())
    return out.detach(), lse.detach(), tuple(t.grad for t in leaves)


CASES = [  # (query length, key length, head dim, causal)
    (1, 1, 8, False),
    (11, 11, 24, False),
    (11, 11, 24, True),
    (5, 64, 8, False),
    (64, 7, 128, True),
    (33, 33, 64, True),
    (64, 64, 128, False),
    (17, 3, 24, True),
    (2, 50, 64, True),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("q_len,k_len,head_dim,causal", CASES)
def test_forward_backward_match_fp64(q_len, k_len, head_dim, causal, dtype, forced):
    # 5 x 3 pairs: tiles of several pairs with a partial last one (long rows: one pair per tile, 2 x 3 do).
    b = 5 if max(q_len, k_len) <= 32 else 2
    q, k, v, dout = _inputs((b, 3, q_len, head_dim), (b, 3, k_len, head_dim), dtype, seed=q_len * 131 + k_len)
    want = _fp64_grads(q, k, v, dout, _visible(range(q_len), range(k_len), causal))
    name, errors, lse_err = _kernel_errors(q, k, v, dout, causal, want)
    assert name == "tiny"
    baseline_name = _baseline(q_len, k_len, causal)
    forced(baseline_name)
    _, baseline, _ = _kernel_errors(q, k, v, dout, causal, want)
    assert lse_err < 1e-5
    for what, got, ref in zip(("out", "dq", "dk", "dv"), errors, baseline, strict=True):
        assert got <= _allowed(ref, dtype), f"{what}: tiny {got:.2e}, {baseline_name} {ref:.2e}"


def _merged_errors(q, k, v, dout, split):
    """Two key blocks merged by lse; each block's backward gets the merged out/lse; grads summed."""
    blocks = (slice(0, split), slice(split, None))
    out, lse = blockwise.empty_partial(q)
    calls = []
    for rows in blocks:
        block_out, block_lse, call = kernels.attention_forward(q, k[:, :, rows], v[:, :, rows])
        blockwise.merge_(out, lse, block_out, block_lse)
        calls.append(call)
    out = out.to(q.dtype)
    grads = [
        kernels.attention_backward(dout, q, k[:, :, r], v[:, :, r], out, lse, c)
        for r, c in zip(blocks, calls, strict=True)
    ]
    dq = sum(g[0].double() for g in grads)
    dk, dv = (torch.cat([g[i] for g in grads], 2) for i in (1, 2))
    return calls[0].kernel, out, lse, (dq, dk, dv)


@needs_triton
@pytest.mark.parametrize(
    "dtype,q_len,k_len,split,head_dim",
    [
        (torch.bfloat16, 11, 11, 4, 24),
        (torch.bfloat16, 64, 64, 23, 128),
        (torch.bfloat16, 5, 40, 39, 8),
        (torch.float16, 33, 20, 1, 64),
    ],
)
def test_backward_of_merged_blocks(dtype, q_len, k_len, split, head_dim, forced):
    q, k, v, dout = _inputs((3, 2, q_len, head_dim), (3, 2, k_len, head_dim), dtype, seed=split)
    ref_out, ref_lse, ref_grads = _fp64_grads(q, k, v, dout, _visible(range(q_len), range(k_len), False))
    baseline_name = _baseline(q_len, k_len)
    results = {}
    for name in ("tiny", baseline_name):
        forced(name)
        got_name, out, lse, grads = _merged_errors(q, k, v, dout, split)
        assert got_name == name
        results[name] = [_err(out, ref_out)] + [_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
        if name == "tiny":
            assert _err(lse, ref_lse) < 1e-5
    for what, got, ref in zip(("out", "dq", "dk", "dv"), results["tiny"], results[baseline_name], strict=True):
        assert got <= _allowed(ref, dtype), f"{what}: tiny {got:.2e}, {baseline_name} {ref:.2e}"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_causal_spans_with_rows_that_see_no_key(dtype, forced):
    """Blockwise pieces (a full block and a causal square), merged; queries 0..2 precede every key."""
    q_spans, k_spans = ((0, 6), (10, 20)), ((3, 14),)
    q_pos = [p for a, b in q_spans for p in range(a, b)]
    k_pos = [p for a, b in k_spans for p in range(a, b)]
    q, k, v, dout = _inputs((2, 3, len(q_pos), 24), (2, 3, len(k_pos), 24), dtype, seed=7)
    ref_out, _, ref_grads = _fp64_grads(q, k, v, dout, _visible(q_pos, k_pos, True))
    baseline_name = _baseline(len(q_pos), len(k_pos))  # its causal pieces are square
    results = {}
    for name in ("tiny", baseline_name):
        forced(name)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = blockwise.span_attention(*leaves, q_spans, k_spans, causal=True, scale=24**-0.5)
        out.backward(dout)
        assert not out.isnan().any()
        assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
        results[name] = [_err(out, ref_out)] + [_err(t.grad, r) for t, r in zip(leaves, ref_grads, strict=True)]
    for what, got, ref in zip(("out", "dq", "dk", "dv"), results["tiny"], results[baseline_name], strict=True):
        assert got <= _allowed(ref, dtype), f"{what}: tiny {got:.2e}, {baseline_name} {ref:.2e}"


@needs_triton
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_kv_heads(kv_heads, forced):
    """GQA/MQA through kernels.py: K/V heads repeated for the call, their gradients summed in fp32."""
    dtype = torch.bfloat16
    q, k, v, dout = _inputs((3, 4, 11, 24), (3, kv_heads, 13, 24), dtype, seed=kv_heads)
    ref_out, ref_lse, ref_grads = _fp64_grads(q, k, v, dout, _visible(range(11), range(13), False))
    name, errors, lse_err = _kernel_errors(q, k, v, dout, False, (ref_out, ref_lse, ref_grads))
    assert name == "tiny"
    baseline_name = _baseline(11, 13)
    forced(baseline_name)
    _, baseline, _ = _kernel_errors(q, k, v, dout, False, (ref_out, ref_lse, ref_grads))
    assert lse_err < 1e-5
    for what, got, ref in zip(("out", "dq", "dk", "dv"), errors, baseline, strict=True):
        assert got <= _allowed(ref, dtype), f"{what}: tiny {got:.2e}, {baseline_name} {ref:.2e}"


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_packed_projection_views_give_the_same_bits(causal, forced):
    """q, k, v as strided views of one (B, L, 3, H, d) projection, out/dout strided too: no copies, same result."""
    b, heads, length, d = 4, 3, 11, 24
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, length, 3, heads, d, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    out, lse = tiny.forward(q, k, v, causal=causal)
    out_c, lse_c = tiny.forward(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    dout = torch.randn(b, length, heads, d, generator=gen).to(DEVICE, torch.bfloat16).transpose(1, 2)
    out_view = out.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L, d) with (B, L, H, d) memory
    grads = tiny.backward(dout, q, k, v, out_view, lse, causal=causal)
    grads_c = tiny.backward(dout.contiguous(), *(t.contiguous() for t in (q, k, v)), out_c, lse_c, causal=causal)
    for got, want in zip(grads, grads_c, strict=True):
        assert torch.equal(got, want)
    # The kernel layer hands the views over as they are (tiny pads no head dim).
    full_out, full_lse, call = kernels.attention_forward(q, k, v, causal=causal)
    assert call.kernel == "tiny" and torch.equal(full_out, out) and torch.equal(full_lse, lse)


@needs_triton
def test_batch_chunking_gives_same_result(monkeypatch, forced):
    q, k, v, dout = _inputs((7, 2, 9, 16), (7, 2, 9, 16), torch.float16, seed=2)
    whole = kernels.attention_forward(q, k, v, causal=True)
    grads_whole = kernels.attention_backward(dout, q, k, v, whole[0], whole[1], whole[2], causal=True)
    monkeypatch.setattr(kernels.TinyKernel, "max_batch", lambda self, h, lq, lk: 3)
    chunked = kernels.attention_forward(q, k, v, causal=True)
    assert chunked[2].kernel == "tiny" and len(chunked[2].aux) == 3
    grads = kernels.attention_backward(dout, q, k, v, chunked[0], chunked[1], chunked[2], causal=True)
    # Other chunks pack the pairs into tiles differently, which may reorder fp32 sums.
    torch.testing.assert_close(chunked[0], whole[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(chunked[1], whole[1])
    for a, b in zip(grads, grads_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@needs_triton
@pytest.mark.parametrize("rows", [16, 32, 64, 128])
def test_tile_configs_agree(rows):
    """Every tile shape a benchmark may pick computes the same attention."""
    q, k, v, dout = _inputs((6, 4, 11, 24), (6, 4, 11, 24), torch.bfloat16, seed=rows)
    config = tiny.TileConfig(rows=rows, num_warps=2)
    out, lse = tiny.forward(q, k, v, config=config)
    ref_out, ref_lse = tiny.forward(q, k, v, config=tiny.TileConfig(rows=16, num_warps=1))
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse)
    grads = tiny.backward(dout, q, k, v, out, lse, config=config)
    ref_grads = tiny.backward(dout, q, k, v, out, lse, config=tiny.TileConfig(rows=16, num_warps=1))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_empty_inputs():
    q = torch.randn(0, 2, 5, 8, dtype=torch.bfloat16)
    out, lse = tiny.forward(q, q, q)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    q = torch.randn(2, 2, 5, 8, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 0, 8, dtype=torch.bfloat16)
    out, lse = tiny.forward(q, k, k)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    dq, dk, dv = tiny.backward(q, q, k, k, out, lse)
    assert not dq.any() and dk.shape == k.shape and dv.shape == k.shape


@needs_cuda
def test_offsets_past_2_to_the_31(forced):
    """batch' x heads x L x d > 2**31 elements: every memory offset must be 64-bit."""
    heads, length, d = 4, 11, 24
    b = (1 << 31) // (heads * length * d) + 64
    if (free := torch.cuda.mem_get_info()[0]) < 30 << 30:
        pytest.skip(f"tensors past 2**31 elements need 30 GiB of free GPU memory, this GPU has {free / 2**30:.1f}")
    q = torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(2, 1, heads, length, d, device="cuda", dtype=torch.bfloat16)
    k, v = (t.expand(b, heads, length, d) for t in small)  # batch stride 0: no 4 GiB copies
    out, lse = tiny.forward(q, k, v)
    dout = torch.ones(1, heads, length, d, device="cuda", dtype=torch.bfloat16).expand(b, heads, length, d)
    dq, dk, dv = tiny.backward(dout, q, k, v, out, lse)
    last = slice(b - 3, b)
    forced("math")
    ref_out, ref_lse, call = kernels.attention_forward(q[last], k[last], v[last])
    ref = kernels.attention_backward(dout[last], q[last], k[last], v[last], ref_out, ref_lse, call)
    assert _err(out[last], ref_out) < 1e-2 and _err(lse[last], ref_lse) < 1e-5
    for got, want in zip((dq, dk, dv), ref, strict=True):
        assert _err(got[last], want) < 2e-2


@needs_cuda
def test_selected_automatically_where_it_applies():
    q = torch.randn(8, 4, 11, 24, device="cuda", dtype=torch.bfloat16)
    assert kernels.select_kernel(q, q).name == "tiny"
    for keys in (65, 40):  # past its limit; past where it is measured faster than cuDNN
        long_keys = torch.randn(8, 4, keys, 24, device="cuda", dtype=torch.bfloat16)
        assert kernels.select_kernel(q, long_keys).name != "tiny"
    assert kernels.select_kernel(q.float(), q.float()).name != "tiny"


def test_reasons_name_every_limit(monkeypatch):
    monkeypatch.delenv("MOSAIC_KERNEL", raising=False)
    q = torch.randn(1, 1, 65, 256)
    k = torch.randn(1, 1, 70, 256)
    reasons = " | ".join(tiny.reasons(BlockSpec.of(q, k)))
    for part in ("needs a cuda device", "dtype torch.float32", "head dim 256 > 128", "query length 65 > 64"):
        assert part in reasons
    assert "key length 70 > 64" in reasons
    assert kernels.KERNELS["tiny"].reasons(BlockSpec.of(q, k)) == tiny.reasons(BlockSpec.of(q, k))
    # Past the shapes measured faster than cuDNN: a reason unless forced.
    q, k = torch.randn(1, 1, 40, 96), torch.randn(1, 1, 8, 96)
    unforced = " | ".join(tiny.reasons(BlockSpec.of(q, k)))
    assert "query length 40 > 32: not measured faster" in unforced and "head dim 96 > 64" in unforced
    monkeypatch.setenv("MOSAIC_KERNEL", "tiny")
    assert not any("> 32" in r or "> 64" in r for r in tiny.reasons(BlockSpec.of(q, k)))


def test_never_picked_on_cpu_unless_forced(monkeypatch):
    """The interpreter is far slower than the CPU flash kernel: it runs only when asked for."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MOSAIC_KERNEL", raising=False)
    q = torch.randn(2, 2, 11, 24, dtype=torch.bfloat16)
    assert kernels.select_kernel(q, q).name == "cpu_flash"
    assert any("TRITON_INTERPRET=1 and MOSAIC_KERNEL=tiny" in r for r in tiny.reasons(BlockSpec.of(q, q)))


def test_named_with_long_keys_says_why():
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="key length 65 > 64"):
        kernels.attention_forward(q, torch.randn(1, 1, 65, 8, dtype=torch.bfloat16), q, kernel="tiny")
