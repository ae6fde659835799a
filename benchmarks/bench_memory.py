"""One GPU: nanoTabPFN's two attentions at 150,000 rows, Mosaic against nn.MultiheadAttention, side by side.

- Row attention (dim 1; every row attends to the first half, the training rows):
  ``mosaic.MultiAxisAttention`` with ``kv_len`` against ``nn.MultiheadAttention``'s
  two calls (train to train, test to train) on the same tensor, Mosaic with every
  block on cuDNN (``MOSAIC_KERNEL=cudnn``), and where flash-attn-4 is installed the
  same layer by hand with FlashAttention-4's ``flash_attn_func``; forward+backward
  time and the peak memory above the inputs.
- Feature attention (dim 2, 11 features, batch' = 150,000): the layer forward+backward
  with Mosaic's kernel choice against the same layer forced onto cuDNN.

bf16 autocast, fp32 inputs (a LayerNorm's output), as in the model. Prints a
table and writes JSON. ``--snapshot DIR`` also records one step of each row
attention with PyTorch's allocator history (``DIR/<name>.pickle``);
``memory_peak.py`` lists what is alive at its peak.

    python benchmarks/bench_memory.py --out memory.json [--snapshot DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from _timing import gpu_name, median_ms

import mosaic
from mosaic import kernels


def _measure(step, reps: int) -> tuple[float, float]:
    """``(median ms, peak GiB above what was allocated before)`` of ``step()`` (forward + backward)."""
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, warmup=0, repeats=reps)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def _snapshot(step, path: Path) -> None:
    """One more ``step()`` with the allocator's history recorded (stack frames of every allocation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    step()
    torch.cuda.synchronize()
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def _forced(kernel: str | None):
    """Run under ``MOSAIC_KERNEL=kernel`` (every block on that kernel), or as Mosaic chooses for ``None``."""

    class Forced:
        def __enter__(self):
            if kernel:
                os.environ["MOSAIC_KERNEL"] = kernel

        def __exit__(self, *exc):
            os.environ.pop("MOSAIC_KERNEL", None)

    return Forced()


def _rows_mosaic(x, grad, n_train, kernel: str | None = None):
    attn = mosaic.MultiAxisAttention(x.shape[-1], 4, 1).cuda()

    def step():
        with _forced(kernel), torch.autocast("cuda", dtype=torch.bfloat16):
            y = attn(x, kv_len=n_train)
        y.backward(grad)

    return step


def _rows_fa4_direct(x, grad, n_train):
    """The same layer by hand: the module's projections, FlashAttention-4's ``flash_attn_func``, its output."""
    from flash_attn.cute import flash_attn_func

    attn = mosaic.MultiAxisAttention(x.shape[-1], 4, 1).cuda()
    b, r, c, e = x.shape

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows = x.transpose(1, 2).reshape(b * c, r, e)
            q = torch.nn.functional.linear(rows, attn.in_proj_weight[:e], attn.in_proj_bias[:e])
            kv = torch.nn.functional.linear(rows[:, :n_train], attn.in_proj_weight[e:], attn.in_proj_bias[e:])
            k, v = kv.view(b * c, n_train, 2, 4, e // 4).unbind(2)
            out = flash_attn_func(q.view(b * c, r, 4, e // 4), k, v)[0]
            y = attn.out_proj(out.reshape(b * c, r, e)).reshape(b, c, r, e).transpose(1, 2)
        y.backward(grad)

    return step


def _rows_mha(x, grad, n_train):
    mha = nn.MultiheadAttention(x.shape[-1], 4, batch_first=True).cuda()
    b, r, c, e = x.shape

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            src = x.transpose(1, 2).reshape(b * c, r, e)
            train = src[:, :n_train]
            left = mha(train, train, train, need_weights=False)[0]
            right = mha(src[:, n_train:], train, train, need_weights=False)[0]
            y = torch.cat([left, right], dim=1).reshape(b, c, r, e).transpose(1, 2)
        y.backward(grad)

    return step


def _features(x, grad, kernel: str | None):
    attn = mosaic.MultiAxisAttention(x.shape[-1], 4, 2).cuda()

    def step():
        with _forced(kernel), torch.autocast("cuda", dtype=torch.bfloat16):
            y = attn(x)
        y.backward(grad)

    return step


def _fa4_installed() -> bool:
    return not kernels.get_kernel("fa4").unavailable(torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--columns", type=int, default=11)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--snapshot", default=None, help="folder for allocator snapshots of the row attentions")
    args = parser.parse_args()
    mosaic.init()
    torch.manual_seed(0)
    shape = (1, args.rows, args.columns, 96)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    n_train = args.rows // 2
    rows = {}
    cases = [
        ("row attention, mosaic", _rows_mosaic(x, grad, n_train)),
        ("row attention, mosaic on cuDNN", _rows_mosaic(x, grad, n_train, "cudnn")),
        ("row attention, nn.MultiheadAttention", _rows_mha(x, grad, n_train)),
        ("feature attention, mosaic", _features(x, grad, None)),
        ("feature attention, mosaic on cuDNN", _features(x, grad, "cudnn")),
    ]
    if _fa4_installed():
        cases.insert(2, ("row attention, FA4 called directly", _rows_fa4_direct(x, grad, n_train)))
        cases.append(("feature attention, mosaic on FA4", _features(x, grad, "fa4")))
    for name, step in cases:
        ms, gib = _measure(step, args.reps)
        rows[name] = {"ms": ms, "peak_gib": gib}
        x.grad = None
        if args.snapshot and name.startswith("row"):
            _snapshot(step, Path(args.snapshot) / f"{name[15:].replace(', ', '_').replace('.', '_')}.pickle")
            x.grad = None
    mosaic.shutdown()
    fa4 = kernels.fa4.installed_version() or "not installed"
    print(f"{gpu_name()}, torch {torch.__version__}, flash-attn-4 {fa4}, shape {shape}, kv_len {n_train}, "
          "bf16 autocast, fwd+bwd")  # fmt: skip
    print(f"{'':<40}{'ms':>10}{'peak GiB':>10}")
    for name, r in rows.items():
        print(f"{name:<40}{r['ms']:>10.1f}{r['peak_gib']:>10.2f}")
    ours, cudnn = rows["row attention, mosaic"], rows["row attention, mosaic on cuDNN"]
    mha = rows["row attention, nn.MultiheadAttention"]
    peak = ours["peak_gib"] / mha["peak_gib"]
    print(f"row attention: {cudnn['ms'] / ours['ms']:.2f}x faster than on cuDNN, peak {peak:.3f}x nn.MHA's")
    if "row attention, FA4 called directly" in rows:
        direct = rows["row attention, FA4 called directly"]
        print(f"row attention: {ours['ms'] / direct['ms']:.3f}x the time of FA4 called directly")
    speed = rows["feature attention, mosaic on cuDNN"]["ms"] / rows["feature attention, mosaic"]["ms"]
    print(f"feature attention {speed:.2f}x faster than cuDNN")
    if args.out:
        with open(args.out, "w") as f:
            info = {"device": gpu_name(), "torch": torch.__version__, "flash-attn-4": fa4, "shape": shape}
            json.dump({**info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
