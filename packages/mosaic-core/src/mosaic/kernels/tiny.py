"""Attention over short sequences (query and key length <= 64) in one fused Triton launch each way.

nanoTabPFN's feature attention attends over ~10 features with batch' = batch x
rows in the 10^5-10^7 range. The fused SDPA kernels spend a 64- or 128-row
tile and a grid slot on every (batch, head) pair there, and their grids cap
batch x heads at 65535, so Mosaic has to cut such a call into many launches:
launches and empty tile rows, not bytes, set the time.

Here one program packs several (batch, head) pairs into one tile instead. With
``L`` query rows and ``S`` key rows per pair, the query tile holds ``P`` pairs
back to back (row ``r`` is pair ``r // L``, position ``r % L``; ``P = 16 //
max(L, S)`` by default) and the key tile the same ``P`` pairs' keys. One
``tl.dot`` gives all ``P x P`` pair blocks of scores; a mask keeps the ``P``
diagonal ones (and the causal triangle), so a pair never sees another pair's
keys::

    query rows      keys: pair 0 | pair 1 | pair 2
    pair 0 (L rows)      visible  |   -    |   -
    pair 1 (L rows)         -     | visible|   -
    pair 2 (L rows)         -     |   -    | visible

The off-diagonal products are wasted arithmetic, which is cheap: tensor cores
are idle at these sizes and the kernel is bound by memory traffic. Rows and
head dims are padded to powers of two by masked loads, never by copies, and
q, k, v, out and dout are read through their strides (Mosaic hands over views
of a packed projection). The grid is one-dimensional over tiles, so batch' x
heads is limited only by memory, and every memory offset is 64-bit. Lengths,
head dim and pairs per tile are compile-time constants (one compilation per
shape a model uses), so row arithmetic is shifts and multiplies and the masks
let Triton vectorise the loads.

The forward returns ``(out, lse)`` with ``lse`` the fp32 natural-log
log-sum-exp of the scaled scores (``-inf`` for a row with no key). The
backward takes the *final* ``out`` and ``lse``, which may merge this block with
others, and recomputes ``P = exp(S * scale - lse)`` and
``delta = rowsum(dout * out)`` from them; it never recomputes ``lse``.
Accumulation is fp32. The flash and cuDNN kernels round the probabilities and
``dS`` to bf16 (8 significant bits) before their matmuls; here each enters as
the sum of two bf16/fp16 parts (~16 bits), which costs one more small matmul
and leaves the output rounding as the only bf16 error that matters. Query and
key heads are equal: :func:`mosaic.kernels.attention_forward` repeats grouped K/V heads before
the call and sums their gradients after it (docs/kernels.md says why).

Triton is imported on first use, so ``import mosaic`` works without it. With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's
interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .contract import BlockSpec, Kernel, cuda_capability

__all__ = [
    "AUTO_MAX_HEAD_DIM",
    "AUTO_MAX_LEN",
    "MAX_HEAD_DIM",
    "MAX_LEN",
    "TileConfig",
    "TinyKernel",
    "backward",
    "default_config",
    "device_reasons",
    "forward",
    "reasons",
]

MAX_LEN = 64
MAX_HEAD_DIM = 128
# Where it is picked without being asked for: the shapes measured faster than
# cuDNN on an H200 (docs/kernels.md). Larger ones run, tested, when forced.
AUTO_MAX_LEN = 32
AUTO_MAX_HEAD_DIM = 64
DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = math.log2(math.e)

# ``triton.language``, bound by :func:`_kernels` on first use: Triton resolves the
# names a kernel uses through the globals of the module that defines it.
tl: Any = None


@dataclass(frozen=True)
class TileConfig:
    """Rows per tile (pairs are packed up to this many query and key rows) and warps per program."""

    rows: int
    num_warps: int


def default_config(q_len: int, k_len: int, head_dim: int) -> TileConfig:
    """The tile shape used unless one is given: 16 rows, one warp per 1024 elements of the largest tile, at most 4.

    At (150000, 4, 11, 24) on an H200, 16 rows with one warp was the fastest
    of 13 shapes (1.53 ms fwd+bwd; 32 rows with one warp 1.61, with two 1.97;
    docs/kernels.md). More warps only pay once a tile's elements would spill
    registers; 4 is the most the GPU tests ran.
    """
    rows = 16
    tiles = _tiles(q_len, k_len, head_dim, TileConfig(rows, 1))
    side = max(tiles.block_m, tiles.block_n)
    return TileConfig(rows, min(4, max(1, side * max(side, tiles.block_d) // 1024)))


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reasons(device: torch.device) -> list[str]:
    """Why the tiny kernel can't run anything on ``device`` (no CUDA GPU of sm80+, no Triton)."""
    out = []
    forced = os.environ.get("MOSAIC_KERNEL") == "tiny"
    capability = cuda_capability(device)
    if device.type == "cuda":
        if capability is not None and capability < (8, 0):
            out.append("needs compute capability >= (8, 0)")
    elif not (device.type == "cpu" and interpreted() and forced):
        out.append(
            f"needs a cuda device, got {device.type} (CPU tensors run only through Triton's interpreter, "
            "with TRITON_INTERPRET=1 and MOSAIC_KERNEL=tiny)"
        )
    if not triton_importable():
        out.append("triton is not importable")
    return out


def reasons(spec: BlockSpec) -> list[str]:
    """Why the tiny kernel can't run the block ``spec``; empty when it can.

    CPU tensors run through Triton's interpreter only when it is on and the
    kernel is forced (``MOSAIC_KERNEL=tiny``): it is far slower than the CPU
    flash kernel, so it must never be picked on its own. Lengths above
    :data:`AUTO_MAX_LEN` and head dims above :data:`AUTO_MAX_HEAD_DIM` also
    run only when forced.
    """
    out = device_reasons(spec.device)
    forced = os.environ.get("MOSAIC_KERNEL") == "tiny"
    if spec.dtype not in DTYPES:
        out.append(f"dtype {spec.dtype} not in {[str(d) for d in DTYPES]}")
    for what, n in (("query", spec.q_len), ("key", spec.k_len)):
        if n > MAX_LEN:
            out.append(f"{what} length {n} > {MAX_LEN}")
        elif n > AUTO_MAX_LEN and not forced:
            out.append(
                f"{what} length {n} > {AUTO_MAX_LEN}: not measured faster than cuDNN (MOSAIC_KERNEL=tiny runs it)"
            )
    if spec.head_dim > MAX_HEAD_DIM:
        out.append(f"head dim {spec.head_dim} > {MAX_HEAD_DIM}")
    elif spec.head_dim > AUTO_MAX_HEAD_DIM and not forced:
        out.append(
            f"head dim {spec.head_dim} > {AUTO_MAX_HEAD_DIM}: not measured faster than cuDNN "
            "(MOSAIC_KERNEL=tiny runs it)"
        )
    return out


class TinyKernel(Kernel):
    """Query and key lengths <= 64 (feature attention): many (batch, head) pairs per tile."""

    name = "tiny"
    strided_inputs = True
    device_type = ""  # CUDA, or CPU through Triton's interpreter when forced: reasons() decides

    def unavailable(self, device: torch.device) -> list[str]:
        return device_reasons(device)

    def reasons(self, spec: BlockSpec) -> list[str]:
        return reasons(spec)

    def max_batch(self, heads: int, q_len: int, k_len: int) -> int:
        return 1 << 62  # its grid is 1-D over tiles: no 65535 limit to chunk for

    def forward(self, q, k, v, causal, scale):
        out, lse = forward(q, k, v, causal=causal, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class _Tiles:
    pairs: int
    block_m: int
    block_n: int
    block_d: int


def _tiles(q_len: int, k_len: int, head_dim: int, config: TileConfig) -> _Tiles:
    """Pairs per tile and the padded tile sides; ``tl.dot`` needs every side >= 16."""
    pairs = max(1, min(config.rows // q_len, config.rows // k_len))
    return _Tiles(pairs, max(16, _pow2(pairs * q_len)), max(16, _pow2(pairs * k_len)), max(16, _pow2(head_dim)))


def _alignment(*tensors: torch.Tensor) -> int:
    """Elements (a power of two, at most 16 bytes) that every row offset is a multiple of: lets loads vectorise.

    Offsets are relative to each tensor's data pointer, whose own alignment
    Triton checks by itself.
    """
    g = 16 // tensors[0].element_size()
    for t in tensors:
        if t.stride(-1) != 1:
            return 1
        g = math.gcd(g, *t.stride()[:-1])
    return g


def _cdiv(n: int, m: int) -> int:
    return -(-n // m)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape[:2] != q.shape[:2] or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"tiny needs q (B, H, L, d) and k, v (B, H, S, d); got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"tiny needs one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > MAX_LEN or k.shape[2] > MAX_LEN or q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"tiny runs lengths <= {MAX_LEN} and head dims <= {MAX_HEAD_DIM}; got {q.shape}, {k.shape}")
    if q.shape[0] * q.shape[1] >= 1 << 31:
        raise ValueError(f"batch x heads = {q.shape[0] * q.shape[1]} must be < 2**31")


def _constants(q: torch.Tensor, k: torch.Tensor, causal: bool, config: TileConfig | None, aligned: int) -> dict:
    """The kernels' compile-time arguments and launch options for this shape."""
    _, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    config = config or default_config(q_len, k_len, head_dim)
    tiles = _tiles(q_len, k_len, head_dim, config)
    return {
        "HEADS": heads,
        "Q_LEN": q_len,
        "K_LEN": k_len,
        "HEAD_DIM": head_dim,
        "PAIRS": tiles.pairs,
        "ALIGN": aligned,
        "CAUSAL": causal,
        "UPCAST": _upcast(q.dtype),
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "BLOCK_D": tiles.block_d,
        "num_warps": config.num_warps,
    }


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q (B, H, L, d)`` over ``k, v (B, H, S, d)``; ``causal`` is top-left aligned.

    ``config`` overrides :func:`default_config` (benchmarks sweep it).
    """
    _check(q, k, v)
    b, h, q_len, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # (B, L, H, d) in memory: what the output projection reads, so its transpose is a view.
    out = q.new_empty((b, q_len, h, d)).transpose(1, 2)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if b * h == 0 or q_len == 0:
        return out, lse
    if k.shape[2] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    constants = _constants(q, k, causal, config, _alignment(q, k, v))
    forward_kernel, _ = _kernels()
    forward_kernel[(_cdiv(b * h, constants["PAIRS"]),)](
        q, k, v, out, lse, b * h, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(), **constants
    )
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the input dtype, given the final (possibly merged) ``out`` and ``lse``."""
    _check(q, k, v)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"dout and out must be shaped like q {q.shape} and lse like {q.shape[:3]}")
    b, h, q_len, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if b * h == 0 or q_len == 0 or k.shape[2] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out, dout, lse = out.to(q.dtype), dout.to(q.dtype), lse.to(torch.float32)
    constants = _constants(q, k, causal, config, _alignment(q, k, v, out, dout))
    _, backward_kernel = _kernels()
    backward_kernel[(_cdiv(b * h, constants["PAIRS"]),)](
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
        b * h,
        scale,
        scale * _LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *dout.stride(),
        *lse.stride(),
        **constants,
    )
    return dq, dk, dv


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted forward and backward kernels (imports Triton, which reads ``TRITON_INTERPRET`` here)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_forward_kernel), triton.jit(_backward_kernel)


def _upcast(dtype: torch.dtype) -> bool:
    """Whether matmul operands go to fp32 (after rounding to ``dtype``, so every product is the same).

    Only under the interpreter, which multiplies bf16 tensors as their raw
    uint16 bits (``create_dot`` in triton/runtime/interpreter.py, Triton 3.9).
    """
    return dtype == torch.bfloat16 and interpreted()


# The kernels are plain functions until _kernels() jits them. A tile holds PAIRS
# consecutive (batch, head) pairs, pair p = b * HEADS + h: query row r is pair
# r // Q_LEN at position r % Q_LEN, key column c is pair c // K_LEN at position
# c % K_LEN. Pair arithmetic is int32 (batch x heads < 2**31), memory offsets
# int64. Inputs are strided; out is written through its strides too (the wrapper
# lays it out as (B, L, H, d), so the output projection needs no copy); lse, dq,
# dk and dv are contiguous.


def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    n_pairs,
    scale_log2,
    sqb,
    sqh,
    sql,
    sqd,
    skb,
    skh,
    skl,
    skd,
    svb,
    svh,
    svl,
    svd,
    sob,
    soh,
    sol,
    sod,
    HEADS: tl.constexpr,
    Q_LEN: tl.constexpr,
    K_LEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    first = tl.program_id(0) * PAIRS
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_slot, q_pos = rows // Q_LEN, rows % Q_LEN
    k_slot, k_pos = cols // K_LEN, cols % K_LEN
    q_pair, k_pair = first + q_slot, first + k_slot
    q_ok = (q_slot < PAIRS) & (q_pair < n_pairs)
    k_ok = (k_slot < PAIRS) & (k_pair < n_pairs)
    d_ok = dims < HEAD_DIM
    q_mask = q_ok[:, None] & d_ok[None, :]
    k_mask = k_ok[:, None] & d_ok[None, :]
    qb, qh, qp = (q_pair // HEADS).to(tl.int64), (q_pair % HEADS).to(tl.int64), q_pos.to(tl.int64)
    kb, kh, kp = (k_pair // HEADS).to(tl.int64), (k_pair % HEADS).to(tl.int64), k_pos.to(tl.int64)

    q_row = tl.multiple_of(qb * sqb + qh * sqh + qp * sql, ALIGN)
    k_row = tl.multiple_of(kb * skb + kh * skh + kp * skl, ALIGN)
    v_row = tl.multiple_of(kb * svb + kh * svh + kp * svl, ALIGN)
    q = tl.load(q_ptr + q_row[:, None] + dims[None, :] * sqd, mask=q_mask, other=0.0)
    k = tl.load(k_ptr + k_row[:, None] + dims[None, :] * skd, mask=k_mask, other=0.0)
    v = tl.load(v_ptr + v_row[:, None] + dims[None, :] * svd, mask=k_mask, other=0.0)
    io = q.dtype
    if UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)

    visible = (q_slot[:, None] == k_slot[None, :]) & k_ok[None, :]
    if CAUSAL:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    # Scores in log2 units: exp2 is the hardware instruction.
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row with no key: p = 0 everywhere, no NaN
    p = tl.exp2(s - m[:, None])
    total = tl.sum(p, 1)
    empty = total == 0.0
    # P as a sum of two io-dtype parts: the product keeps ~16 bits of P instead of bf16's 8.
    p_hi = p.to(io)
    p_lo = (p - p_hi.to(tl.float32)).to(io)
    acc = tl.dot(p_hi.to(v.dtype), v) + tl.dot(p_lo.to(v.dtype), v)
    o = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)

    out_row = qb * sob + qh * soh + qp * sol
    tl.store(o_ptr + out_row[:, None] + dims[None, :] * sod, o.to(o_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + q_pair.to(tl.int64) * Q_LEN + qp, lse, mask=q_ok)


def _backward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    n_pairs,
    scale,
    scale_log2,
    sqb,
    sqh,
    sql,
    sqd,
    skb,
    skh,
    skl,
    skd,
    svb,
    svh,
    svl,
    svd,
    sob,
    soh,
    sol,
    sod,
    sdb,
    sdh,
    sdl,
    sdd,
    slb,
    slh,
    sll,
    HEADS: tl.constexpr,
    Q_LEN: tl.constexpr,
    K_LEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    first = tl.program_id(0) * PAIRS
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_slot, q_pos = rows // Q_LEN, rows % Q_LEN
    k_slot, k_pos = cols // K_LEN, cols % K_LEN
    q_pair, k_pair = first + q_slot, first + k_slot
    q_ok = (q_slot < PAIRS) & (q_pair < n_pairs)
    k_ok = (k_slot < PAIRS) & (k_pair < n_pairs)
    d_ok = dims < HEAD_DIM
    q_mask = q_ok[:, None] & d_ok[None, :]
    k_mask = k_ok[:, None] & d_ok[None, :]
    qb, qh, qp = (q_pair // HEADS).to(tl.int64), (q_pair % HEADS).to(tl.int64), q_pos.to(tl.int64)
    kb, kh, kp = (k_pair // HEADS).to(tl.int64), (k_pair % HEADS).to(tl.int64), k_pos.to(tl.int64)

    q_row = tl.multiple_of(qb * sqb + qh * sqh + qp * sql, ALIGN)
    k_row = tl.multiple_of(kb * skb + kh * skh + kp * skl, ALIGN)
    v_row = tl.multiple_of(kb * svb + kh * svh + kp * svl, ALIGN)
    o_row = tl.multiple_of(qb * sob + qh * soh + qp * sol, ALIGN)
    do_row = tl.multiple_of(qb * sdb + qh * sdh + qp * sdl, ALIGN)
    q = tl.load(q_ptr + q_row[:, None] + dims[None, :] * sqd, mask=q_mask, other=0.0)
    k = tl.load(k_ptr + k_row[:, None] + dims[None, :] * skd, mask=k_mask, other=0.0)
    v = tl.load(v_ptr + v_row[:, None] + dims[None, :] * svd, mask=k_mask, other=0.0)
    o = tl.load(o_ptr + o_row[:, None] + dims[None, :] * sod, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + do_row[:, None] + dims[None, :] * sdd, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + qb * slb + qh * slh + qp * sll, mask=q_ok, other=0.0)
    io = q.dtype
    if UPCAST:
        q, k, v, do = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)

    visible = (q_slot[:, None] == k_slot[None, :]) & k_ok[None, :]
    if CAUSAL:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    # P from the final lse: this block's exact share even when out/lse merge several blocks.
    s = tl.dot(q, tl.trans(k)) * scale_log2
    p = tl.where(visible, tl.exp2(s - (lse * 1.4426950408889634)[:, None]), 0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # P and dS enter their matmuls as two io-dtype parts each (see the forward).
    p_hi = p.to(io)
    p_lo = (p - p_hi.to(tl.float32)).to(io)
    dv = tl.dot(tl.trans(p_hi.to(do.dtype)), do) + tl.dot(tl.trans(p_lo.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    ds_hi = ds.to(io)
    ds_lo = (ds - ds_hi.to(tl.float32)).to(io).to(q.dtype)
    ds_hi = ds_hi.to(q.dtype)
    dq = (tl.dot(ds_hi, k) + tl.dot(ds_lo, k)) * scale
    dk = (tl.dot(tl.trans(ds_hi), q) + tl.dot(tl.trans(ds_lo), q)) * scale

    dq_row = (q_pair.to(tl.int64) * Q_LEN + qp) * HEAD_DIM
    dk_row = (k_pair.to(tl.int64) * K_LEN + kp) * HEAD_DIM
    tl.store(dq_ptr + dq_row[:, None] + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_mask)
    tl.store(dk_ptr + dk_row[:, None] + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + dk_row[:, None] + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=k_mask)
