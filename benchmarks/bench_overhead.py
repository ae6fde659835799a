"""Per-call overhead of a small sharded layer: time per forward+backward and host collectives per call.

On a shape this small the attention itself takes microseconds, so the time is
Mosaic's own work: agreeing on the facts, planning (or finding the cached
plan), the collectives' launch. One step is ``--layers`` sharded layers'
forwards and one backward; the figures are per call (a step's time over its
layers). Runs under torchrun on CPU (gloo) or GPUs, on this code or an older
checkout (the same script: it counts the host collectives of either); prints a
table and writes JSON.

    torchrun --nproc_per_node=2 benchmarks/bench_overhead.py --out overhead.json
    torchrun --nproc_per_node=2 benchmarks/bench_overhead.py --checks every_call --out debug.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import mosaic


def _host_collectives(ctx) -> int | None:
    """Host collectives Mosaic has made on this rank (agreements; the guard's count before them)."""
    if hasattr(ctx, "agreement"):
        return ctx.agreement.rounds + ctx.world_agreement.rounds
    guard = getattr(ctx, "guard", None)  # the code before agreement (aac2f66 and older)
    return None if guard is None else guard.calls + ctx.world_guard.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["ring", "allgather"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 16, 2, 16], help="(batch, rows, features, embed)")
    parser.add_argument("--checks", default="default", help="mosaic.init(checks=...); default: the code's default")
    parser.add_argument("--layers", type=int, default=1, help="sharded layers per step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = mosaic.init(sp_size=world) if args.checks == "default" else mosaic.init(sp_size=world, checks=args.checks)
    torch.set_num_threads(1)
    rows = []
    for name in args.backends:
        layers = [
            mosaic.MultiAxisAttention(args.shape[-1], 4, 1, backend=name).to(ctx.device) for _ in range(args.layers)
        ]
        x = ctx.shard(torch.randn(args.shape, device=ctx.device), 1).contiguous().requires_grad_()
        times, collectives = [], []
        for i in range(args.warmup + args.calls):
            before = _host_collectives(ctx)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            y = x
            for layer in layers:
                y = layer(y)
            y.sum().backward()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.layers
            if i >= args.warmup:
                times.append(elapsed)
                after = _host_collectives(ctx)
                collectives.append(None if before is None else (after - before) / args.layers)
        row = {
            "backend": name,
            "median_us": statistics.median(times) * 1e6,
            "mean_us": statistics.fmean(times) * 1e6,
            "host_collectives_per_call": collectives[-1],
        }
        rows.append(row)
    if ctx.rank == 0:
        print(f"checks={args.checks}, shape {args.shape}, {args.layers} layer(s) per step, world {ctx.world_size}, "
              f"{ctx.device}")  # fmt: skip
        print(f"torch {torch.__version__}")
        print(f"{'backend':<12}{'median µs':>12}{'mean µs':>12}{'host collectives / call':>26}")
        for r in rows:
            print(
                f"{r['backend']:<12}{r['median_us']:>12.0f}{r['mean_us']:>12.0f}{r['host_collectives_per_call']!s:>26}"
            )
        result = {
            "shape": args.shape,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "torch": torch.__version__,
            "mosaic": getattr(mosaic, "__version__", "?"),
            "checks": args.checks,
            "layers": args.layers,
            "rows": rows,
        }
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    mosaic.shutdown()


if __name__ == "__main__":
    main()
