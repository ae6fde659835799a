"""Single-GPU kernel benchmark: Mosaic's block kernels against torch SDPA, fwd+bwd.

For each shape it times ``F.scaled_dot_product_attention`` pinned to each
fused backend, plain batched matmuls with an fp32 softmax, FlashAttention-4's
own ``flash_attn_func`` (when flash-attn-4 is installed), and Mosaic's
``local`` path with each of its kernels (``fa4``, ``cudnn``, ``flash``,
``tiny``), and checks that Mosaic's choice is the fastest. The ``rows_*``
shapes are nanoTabPFN's row attention: queries over a key prefix. ``--packed``
hands q, k, v over as views of one ``(B, L, 3, H, d)`` projection, as
MultiAxisAttention does; ``--tiny-configs`` also sweeps the tiny
kernel's tile shapes (forward alone and forward + backward). Prints a table and
writes JSON.

    python benchmarks/bench_kernels.py --out kernels.json
    python benchmarks/bench_kernels.py --shapes features_b150k_L11 --packed --tiny-configs
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _timing import fwd_bwd_ms, gpu_name, median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from mosaic import kernels
from mosaic.blockwise import span_attention
from mosaic.kernels import tiny

SHAPES = {
    # nanoTabPFN's row attention at 150,000 rows: 11 columns, every row attends to the 75,000 train rows.
    "rows_b11_L150k_kv75k": (11, 4, 150000, 24, 75000),
    "rows_b11_L50k_kv25k": (11, 4, 50000, 24, 25000),
    "tabpfn_b5_L64k": (5, 4, 65536, 24),
    "tabpfn_b160_L16k": (160, 4, 16384, 24),
    "llm_b1_h16_L64k": (1, 16, 65536, 128),
    # nanoTabPFN feature attention: batch x rows folded, a few features.
    "features_b655k_L6": (5 * 131072, 4, 6, 24),
    "features_b150k_L11": (150000, 4, 11, 24),  # nanoTabPFN at 150k rows, 10 features + target
    "features_b1M_L11": (1000000, 4, 11, 24),
    # Other short sequences the tiny kernel takes: is it still the fastest?
    "short_b16k_h4_L32_d64": (16384, 4, 32, 64),
    "short_b20k_h8_L64_d128": (20000, 8, 64, 128),
    "short_b64_h8_L64_d64": (64, 8, 64, 64),
}
TINY_CONFIGS = [
    tiny.TileConfig(rows, warps) for rows in (16, 32, 64, 128) for warps in (1, 2, 4, 8) if warps <= rows // 8
]


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _bmm_fp32_softmax(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(-1).to(q.dtype), v)


class _TinyWith(torch.autograd.Function):
    """The tiny kernel with a given tile shape, for the sweep."""

    @staticmethod
    def forward(ctx, q, k, v, config):
        out, lse = tiny.forward(q, k, v, config=config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*tiny.backward(dout, q, k, v, out, lse, config=ctx.config), None)


def _inputs(shape: tuple[int, ...], packed: bool) -> tuple[torch.Tensor, ...]:
    """q ``(b, h, n, d)`` and k, v ``(b, h, kv, d)`` (``kv`` = ``n`` unless the shape gives it)."""
    b, h, n, d, kv = (*shape, shape[2])[:5]
    if packed:  # q, k, v from one projection of the n rows; the keys are its first kv rows, as with kv_len
        qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return q, k[:, :, :kv], v[:, :, :kv]
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    return q, *(torch.randn(b, h, kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))


def _tiny_grads(q, k, v, grad, config) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = _TinyWith.apply(*leaves, config)
    out.backward(grad)
    return (out, *(t.grad for t in leaves))


def _sweep(name: str, q, k, v, results: dict) -> None:
    """Time every tile shape; record how far its out, dq, dk, dv are from the default's."""
    grad = torch.randn_like(q)
    want = _tiny_grads(q, k, v, grad, None)
    for config in TINY_CONFIGS:
        label = f"tiny_rows{config.rows}_warps{config.num_warps}"
        try:
            with torch.no_grad():
                fwd = median_ms(lambda config=config: tiny.forward(q, k, v, config=config))
            both = fwd_bwd_ms(lambda q, k, v, config=config: _TinyWith.apply(q, k, v, config), q, k, v)
            got = _tiny_grads(q, k, v, grad, config)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want, strict=True))
        except Exception as exc:  # a tile shape may not compile (registers, shared memory): record why
            print(f"{name:22s} {label:24s} {'failed':>10s}  {type(exc).__name__}: {str(exc)[:80]}")
            results[f"{name}/{label}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            continue
        results[f"{name}/{label}_fwd_ms"] = fwd
        results[f"{name}/{label}_ms"] = both
        results[f"{name}/{label}_max_diff"] = diff
        print(f"{name:22s} {label:24s} {both:10.2f}  (fwd {fwd:.2f}, max diff of out/dq/dk/dv {diff:.1e})")


def _time(name: str, variants: dict, q, k, v, results: dict) -> None:
    for variant, fn in variants.items():
        try:
            ms = fwd_bwd_ms(fn, q, k, v)
        except Exception as exc:  # a backend may reject a shape; record why
            print(f"{name:22s} {variant:24s} {'failed':>10s}  {type(exc).__name__}: {str(exc)[:80]}")
            results[f"{name}/{variant}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            continue
        results[f"{name}/{variant}_ms"] = ms
        print(f"{name:22s} {variant:24s} {ms:10.2f}")


def _mosaic(kernel: str | None):
    def run(q, k, v):
        if kernel:
            os.environ["MOSAIC_KERNEL"] = kernel
        try:
            return span_attention(q, k, v, ((0, q.shape[2]),), ((0, k.shape[2]),), scale=q.shape[-1] ** -0.5)
        finally:
            os.environ.pop("MOSAIC_KERNEL", None)

    return run


def _fa4_direct(q, k, v):
    """FlashAttention-4's own ``flash_attn_func`` on the (b, n, h, d) memory of q, k, v: the target to match."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2)


def _fa4_installed() -> bool:
    return not kernels.get_kernel("fa4").unavailable(torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--packed", action="store_true", help="q, k, v as views of one (B, L, 3, H, d) projection")
    parser.add_argument("--tiny-configs", action="store_true", help="also sweep the tiny kernel's tile shapes")
    args = parser.parse_args()
    fa4 = kernels.fa4.installed_version() or "not installed"
    results: dict[str, object] = {"gpu": gpu_name(), "torch": torch.__version__, "flash-attn-4": fa4}
    results["packed"] = args.packed
    print(f"{'shape':22s} {'variant':24s} {'ms':>10s}")
    for name in args.shapes:
        q, k, v = _inputs(SHAPES[name], args.packed)
        mosaic = {
            "mosaic_auto": _mosaic(None),
            **{f"mosaic_{kname}": _mosaic(kname) for kname in ("fa4", "cudnn", "flash", "tiny")},
            "bmm_fp32_softmax": _bmm_fp32_softmax,
        }
        if _fa4_installed():
            mosaic["fa4_direct"] = _fa4_direct
        raw = {
            "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
        }
        _time(name, mosaic, q, k, v, results)
        auto = kernels.select_kernel(q, k).name
        results[f"{name}/mosaic_auto_kernel"] = auto
        print(f"{name:22s} mosaic picks {auto}")
        if args.tiny_configs and max(q.shape[2], k.shape[2]) <= tiny.MAX_LEN and q.shape[3] <= tiny.MAX_HEAD_DIM:
            _sweep(name, q, k, v, results)
        # Raw SDPA last: past the grid limits a call may fault (flash at (20000, 8, 64, 128),
        # torch 2.11) and poison the CUDA context, failing every later call: run later shapes alone then.
        _time(name, raw, q, k, v, results)
        del q, k, v
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every shape: a run stopped by a time limit keeps what it measured
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
