"""GPU correctness of every installed strategy, under torchrun with NCCL.

    torchrun --nproc_per_node=4 tests/gpu/check_backends.py [--out DIR]
    torchrun --nproc_per_node=4 tests/gpu/check_backends.py --one-gpu   # 4 ranks on one GPU (gloo, staged)
    MOSAIC_KERNEL=cudnn torchrun ... check_backends.py                  # every block on cuDNN
    torchrun ... check_backends.py --baseline-kernel cudnn              # held against cuDNN's single-GPU error

``--one-gpu`` runs P ranks on GPU 0 over gloo, CUDA tensors staged through host
memory (``mosaic.comm.staged``): the GPU kernels meet every strategy's
distributed code path where only one GPU is lent (the engines, which bring
their own NCCL calls, are left out).

For each backend, dtype (bf16, fp16) and case, the sharded run is compared
with the unsharded ``local`` run in fp32 (output, input gradients, parameter
gradients summed over the sp group), next to the same errors of the
single-GPU ``local`` run in that dtype. Runs are mixed precision as training
is: fp32 parameters and inputs, attention and projections under autocast. A case passes when the sharded error
is at most ``SLACK`` x the single-GPU error (plus a small floor): sharding must
not make bf16 worse. Prints a table on rank 0, writes JSON, exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import mosaic
from mosaic.testing import compare_with_local

SLACK = 1.5
FLOOR = 2e-3


def _configs(world: int) -> list[tuple[str, dict]]:
    """(label, kwargs for compare_with_local) per strategy that this world size can run."""
    half = max(1, world // 2)
    configs = [
        ("ring", dict(backend="ring")),
        ("allgather", dict(backend="allgather")),
        ("allgather chunks=3", dict(backend="allgather", backend_options={"chunks": 3})),
        ("mesh2d", dict(backend="mesh2d", mesh_shape=(2, half) if world >= 2 else (1, 1))),
        ("ulysses", dict(backend="ulysses")),
        (
            "composed(2,s) ring",
            dict(backend="composed", mesh_shape=(2, half), backend_options={"seq_parallel": "ring"}),
        ),
    ]
    configs += [
        ("switch", dict(backend="switch")),
        ("auto", dict(backend="auto")),
        ("magi", dict(backend="magi")),
    ]
    if world >= 4:
        pairs = [(inter, intra) for inter in ("ring", "allgather") for intra in ("ring", "allgather", "ulysses")]
        for inter, intra in pairs:
            options = {"intra_node_size": 2, "inter_node_strategy": inter, "intra_node_strategy": intra}
            configs.append((f"hierarchical {inter}/{intra}", dict(backend="hierarchical", backend_options=options)))
    return configs


def _cases(length: int) -> list[tuple[str, dict]]:
    """nanoTabPFN's attention (embed 96, 4 heads of 24) over a length no group size divides."""
    shape = (2, length, 3, 96)
    return [
        ("self", dict(shape=shape, attention_axis=1)),
        ("axis 2", dict(shape=(2, 3, length, 96), attention_axis=2)),
        ("kv_len", dict(shape=shape, attention_axis=1, kv_len=length // 2 - 3)),
        ("causal", dict(shape=shape, attention_axis=1, causal=True)),
        ("gqa", dict(shape=shape, attention_axis=1, num_kv_heads=2)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--length", type=int, default=2051, help="global length of the attention dim")
    parser.add_argument("--backends", nargs="*", default=None, help="only these backends (default: all installed)")
    parser.add_argument("--cases", nargs="*", default=None, help="only these cases (default: all)")
    parser.add_argument("--one-gpu", action="store_true", help="every rank on GPU 0, gloo with staged transfers")
    parser.add_argument("--baseline-kernel", default=None, help="the single-GPU local run's kernel (e.g. cudnn)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.one_gpu:
        ctx = mosaic.init(sp_size=world, backend="gloo", device="cuda:0")
    else:
        ctx = mosaic.init(sp_size=world)
    engines = {"magi", "ring_flash_attn"}  # their own NCCL calls: not over a staged gloo group
    rows, failed = [], 0
    for label, config in _configs(ctx.sp_size):
        backend = config["backend"]
        if (args.backends is not None and backend not in args.backends) or (args.one_gpu and backend in engines):
            continue
        try:
            mosaic.get_backend(backend)
        except mosaic.BackendUnavailable as exc:
            rows.append({"backend": label, "case": "-", "status": f"skipped: {exc}"[:120]})
            continue
        for case, kwargs in _cases(args.length):
            if args.cases is not None and case not in args.cases:
                continue
            if case == "causal" and backend == "ring":
                kwargs = {**kwargs, "layout": "zigzag"}
            for dtype in (torch.bfloat16, torch.float16):
                row = {"backend": label, "case": case, "dtype": str(dtype)[6:]}
                try:
                    errors = compare_with_local(
                        **config, **kwargs, dtype=dtype, reference_dtype=torch.float32, autocast=True, seed=len(rows),
                        baseline_kernel=args.baseline_kernel,
                    )  # fmt: skip
                except mosaic.BackendNotSupported as exc:
                    row["status"] = "unsupported: " + str(exc).splitlines()[-1].strip()
                    rows.append(row)
                    continue
                worst = max(
                    errors[key] / (SLACK * errors[f"local_{key}"] + FLOOR)
                    for key in errors
                    if not key.startswith("local_")
                )
                row.update(errors, ratio=worst, status="ok" if worst <= 1 else "FAIL")
                failed += worst > 1
                rows.append(row)
    if ctx.rank == 0:
        print(
            f"{'backend':28s} {'case':8s} {'dtype':9s} {'out':>9s} {'local':>9s} {'dx':>9s} {'local':>9s} "
            f"{'params':>9s} {'local':>9s}  status"
        )
        for r in rows:
            if "out" not in r:
                print(f"{r['backend']:28s} {r['case']:8s} {r.get('dtype', ''):9s} {r['status']}")
                continue
            print(
                f"{r['backend']:28s} {r['case']:8s} {r['dtype']:9s} {r['out']:9.2e} {r['local_out']:9.2e} "
                f"{r['dx']:9.2e} {r['local_dx']:9.2e} {r['params']:9.2e} {r['local_params']:9.2e}  {r['status']}"
            )
        kernel = os.environ.get("MOSAIC_KERNEL", "auto")
        name = f"gpu_check_P{ctx.sp_size}{'_one_gpu' if args.one_gpu else ''}_{kernel}.json"
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        info = {"device": device, "torch": torch.__version__, "world": ctx.sp_size, "one_gpu": args.one_gpu,
                "kernel": kernel, "baseline_kernel": args.baseline_kernel or "auto"}  # fmt: skip
        print("  ".join(f"{k}: {v}" for k, v in info.items()))
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
        print(f"{failed} failed; wrote {name}")
    dist.barrier()
    mosaic.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
