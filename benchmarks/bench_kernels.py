"""Single-GPU kernel benchmark: Mosaic's block kernels against torch SDPA, fwd+bwd.

For each shape it times ``F.scaled_dot_product_attention`` pinned to each
fused backend and Mosaic's ``local`` path with each of its kernels, and checks
that Mosaic's choice is the fastest. Prints a table and writes JSON.

    python benchmarks/bench_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _timing import fwd_bwd_ms, gpu_name
from torch.nn.attention import SDPBackend, sdpa_kernel

from mosaic import kernels
from mosaic.blockwise import span_attention

SHAPES = {
    "tabpfn_b5_L64k": (5, 4, 65536, 24),
    "tabpfn_b160_L16k": (160, 4, 16384, 24),
    "llm_b1_h16_L64k": (1, 16, 65536, 128),
    # nanoTabPFN feature attention: batch x rows folded, a few features.
    "features_b655k_L6": (5 * 131072, 4, 6, 24),
}


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _mosaic(kernel: str | None):
    def run(q, k, v):
        if kernel:
            os.environ["MOSAIC_KERNEL"] = kernel
        try:
            n = q.shape[2]
            return span_attention(q, k, v, ((0, n),), ((0, n),), scale=q.shape[-1] ** -0.5)
        finally:
            os.environ.pop("MOSAIC_KERNEL", None)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    dtype = torch.bfloat16
    results: dict[str, object] = {"gpu": gpu_name(), "torch": torch.__version__}
    print(f"{'shape':22s} {'variant':24s} {'ms':>10s}")
    for name in args.shapes:
        b, h, n, d = SHAPES[name]
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
        variants = {
            "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "mosaic_auto": _mosaic(None),
            **{f"mosaic_{kname}": _mosaic(kname) for kname in ("cudnn", "flash")},
        }
        auto = kernels.select_kernel(q).name
        for variant, fn in variants.items():
            try:
                ms = fwd_bwd_ms(fn, q, k, v)
            except Exception as exc:  # a backend may reject a shape; record why
                print(f"{name:22s} {variant:24s} {'failed':>10s}  {type(exc).__name__}: {str(exc)[:80]}")
                results[f"{name}/{variant}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
                continue
            results[f"{name}/{variant}_ms"] = ms
            print(f"{name:22s} {variant:24s} {ms:10.2f}")
        results[f"{name}/mosaic_auto_kernel"] = auto
        print(f"{name:22s} mosaic picks {auto}")
        del q, k, v
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
