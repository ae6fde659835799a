"""Rows per GPU: nanoTabPFN's step time, rows/s and peak memory against the row count, three ways.

- ``train``: a training step (forward, backward, gradient sums, AdamW);
- ``checkpoint``: the same with every block recomputed in the backward;
- ``inference``: the forward under ``torch.no_grad`` with the row-local parts in
  chunks (``inference_rows``), row attention a column at a time;
- ``inference_whole``: the same forward without chunks (the baseline).

Each mode runs at the given row counts until one runs out of memory. Peak memory
grows linearly in the rows (activations; the attention itself keeps nothing
quadratic), so a line through the measured points gives the largest row count
that fits the card, reported as ``predicted_max_rows`` beside the largest that
ran. Prints a table and writes JSON; ``plot_capacity.py`` draws it.

    python benchmarks/bench_capacity.py --out capacity.json
    python benchmarks/bench_capacity.py --modes inference --inference-rows-list 150000 1000000 --kernels fa4 cudnn
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import mosaic
from mosaic import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "nanotabpfn"))

from nanotabpfn.bench import bench_steps
from nanotabpfn.model import NanoTabPFN
from nanotabpfn.prior import PriorConfig, StepSpec, mix, sample

MODES = ("train", "checkpoint", "inference", "inference_whole")


def _point(ctx, mode: str, rows: int, features: int, inference_rows: int, warmup: int) -> dict:
    torch.manual_seed(0)
    chunk = inference_rows if mode == "inference" else None
    model = NanoTabPFN(num_outputs=3, checkpoint_layers=mode == "checkpoint", inference_rows=chunk).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = PriorConfig(rows, features, 3, 1)
    spec = StepSpec(seed=mix("capacity", 0), features=features, train_size=rows // 2)
    tables = sample(config, spec, ctx.sharded_dim(rows, dim=1), ctx.device)
    torch.cuda.empty_cache()
    inference = mode.startswith("inference")
    result = bench_steps(model, optimizer, tables, ctx, steps=1, warmup=warmup, bf16=True, inference=inference)
    return {"rows": rows, "seconds": result["step_time_s"]["median"], "rows_per_s": result["rows_per_s"],
            "peak_gib": result["peak_memory_gib"][0]}  # fmt: skip


def _fit(points: list[dict], total_gib: float) -> int | None:
    """The row count at which a line through the points reaches ``total_gib``."""
    if len(points) < 2:
        return None
    (r0, m0), (r1, m1) = (points[0]["rows"], points[0]["peak_gib"]), (points[-1]["rows"], points[-1]["peak_gib"])
    slope = (m1 - m0) / (r1 - r0)
    return int(r1 + (total_gib - m1) / slope) if slope > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 100_000, 150_000])
    parser.add_argument("--inference-rows-list", type=int, nargs="+", default=[150_000, 300_000, 1_000_000])
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--inference-rows", type=int, default=65_536, help="chunk of the row-local parts")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds a mode may take in all")
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        help="block kernels to run every mode on, side by side (auto: Mosaic's choice; e.g. fa4 cudnn)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ctx = mosaic.init()
    total = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
    found = {}
    runs = [(mode, kernel) for kernel in args.kernels for mode in args.modes]
    for mode, kernel in runs:
        if kernel == "auto":
            os.environ.pop("MOSAIC_KERNEL", None)
        else:
            os.environ["MOSAIC_KERNEL"] = kernel
        label = mode if len(args.kernels) == 1 else f"{mode}@{kernel}"
        points, began = [], time.perf_counter()
        for rows in args.inference_rows_list if mode.startswith("inference") else args.rows:
            if time.perf_counter() - began > args.time_limit:
                break
            try:
                # One untimed step at the first size compiles the kernels; larger sizes reuse them.
                points.append(_point(ctx, mode, rows, args.features, args.inference_rows, int(not points)))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            p = points[-1]
            line = f"{p['rows']:>10}{p['seconds']:>10.2f} s{p['rows_per_s']:>12.0f} rows/s{p['peak_gib']:>8.2f} GiB"
            print(f"{label:<24}{line}")
        found[label] = {
            "kernel": kernel,
            "points": points,
            "largest_run": max((p["rows"] for p in points), default=None),
            "predicted_max_rows": _fit(points, 0.95 * total),
        }
        print(f"{label}: largest run {found[label]['largest_run']}, predicted max {found[label]['predicted_max_rows']}")
        if args.out:  # after every mode, so a run stopped by a time limit keeps what it measured
            result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "total_gib": total,
                      "flash-attn-4": kernels.fa4.installed_version() or "not installed"}  # fmt: skip
            Path(args.out).write_text(json.dumps({**result, "modes": found}, indent=1) + "\n")
    mosaic.shutdown()


if __name__ == "__main__":
    main()
