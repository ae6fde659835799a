"""GPU correctness of the ``ring_flash_attn`` engine, under torchrun with NCCL.

    torchrun --nproc_per_node=4 tests/gpu/check_ring_flash_attn.py [--out DIR]

Needs ``mosaic-ring[flash]`` (flash-attn and ring-flash-attn) on an Ampere or
newer GPU. For every case the sharded run is compared with ``local`` on the
unsharded tensor in fp32 (output, input and kv gradients, parameter gradients
summed over the sp group); a case passes when each error is at most
``max(2 x error of single-GPU local in that dtype, 1e-2)``. Mosaic's own
``ring`` runs the same case for comparison (its errors are printed, not
judged). Then the engine must refuse what it can't run with the right reason,
and the cases run once more with one rank per sp group. Importing Mosaic and
building modules must not import flash-attn or ring-flash-attn. Prints a table
on rank 0, writes JSON, exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.distributed as dist

import mosaic
from mosaic.testing import compare_with_local

ENGINE = "ring_flash_attn"
FACTOR, FLOOR = 2.0, 1e-2
KEYS = ("out", "dx", "dkv", "params")
CAUSAL = {"causal": True, "layout": "zigzag"}
# Every case takes seconds: a hang (e.g. a ring step that never completes) should fail fast.
TIMEOUT = timedelta(seconds=120)


def _cases() -> list[tuple[str, dict]]:
    """(label, kwargs for compare_with_local); every length splits into 2 x 4 equal chunks."""
    n = 1024
    return [
        ("full axis1 d64", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2)),
        ("full axis2 d64", dict(shape=(2, 3, n, 128), attention_axis=2, num_heads=2)),
        ("causal axis1 d64", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, **CAUSAL)),
        ("causal axis2 d64", dict(shape=(2, 3, n, 128), attention_axis=2, num_heads=2, **CAUSAL)),
        ("full d128", dict(shape=(1, 2 * n, 2, 256), attention_axis=1, num_heads=2)),
        ("causal d128", dict(shape=(1, 2 * n, 2, 256), attention_axis=1, num_heads=2, **CAUSAL)),
        ("full d256", dict(shape=(1, n, 2, 512), attention_axis=1, num_heads=2)),
        ("full gqa 4/2", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=4, num_kv_heads=2)),
        ("causal mqa 4/1", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=4, num_kv_heads=1, **CAUSAL)),
        ("full cross", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, kv_length=n // 2)),
        ("full zigzag layout", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, layout="zigzag")),
        ("causal fp16", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, dtype=torch.float16, **CAUSAL)),
        # batch' = 70000 > 65535, the CUDA grid limit: the engine runs the ring per slice.
        ("full batch' 70000", dict(shape=(70000, 16, 8), attention_axis=1, num_heads=1)),
    ]


def _refusals(world: int) -> list[tuple[str, dict, dict, str]]:
    """(label, module kwargs, forward kwargs, phrase the BackendNotSupported message must contain)."""
    # 16P + 2 positions: equal zigzag shards, but the first two of the 2P chunks hold one more.
    odd_chunks = dict(length=16 * world + 2, layout="zigzag")
    return [
        ("fp32", dict(dtype=torch.float32), {}, "dtype torch.float32 not supported"),
        ("fp16 full", dict(dtype=torch.float16), {}, "returns dQ rounded to bfloat16"),
        ("kv_len", {}, dict(kv_len=8), "kv_len not supported"),
        ("causal contiguous", {}, dict(causal=True), "causal=True needs layout='zigzag'"),
        ("head dim 12", dict(embed_dim=24), {}, "head dim 12 is not a multiple of 8"),
        ("uneven shards", dict(length=16 * world + 1), {}, "needs equal shards"),
        ("causal odd chunks", odd_chunks, dict(causal=True), "equal chunks"),
    ]


def _judge(errors: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Worst error / limit over the keys, and each key's limit."""
    limits = {k: max(FACTOR * errors[f"local_{k}"], FLOOR) for k in KEYS if k in errors}
    return max(errors[k] / limits[k] for k in limits), limits


def _run_cases(ctx: mosaic.Context, rows: list[dict]) -> int:
    failed = 0
    for label, kwargs in _cases():
        kwargs = dict(kwargs)
        dtype = kwargs.pop("dtype", torch.bfloat16)
        row = {"P": ctx.sp_size, "case": label, "dtype": str(dtype)[6:]}
        try:
            errors = compare_with_local(ENGINE, **kwargs, dtype=dtype, reference_dtype=torch.float32)
            ring = compare_with_local("ring", **kwargs, dtype=dtype, reference_dtype=torch.float32)
        except Exception as exc:  # report the case and go on; every rank raises alike
            row.update(status=f"ERROR {type(exc).__name__}: {exc}".splitlines()[0][:200])
            row["traceback"] = traceback.format_exc()
            failed += 1
            rows.append(row)
            continue
        worst, limits = _judge(errors)
        row.update(errors, limits=limits, ring={k: ring[k] for k in limits})
        row.update(ratio=worst, status="ok" if worst <= 1 else "FAIL")
        failed += worst > 1
        rows.append(row)
    return failed


def _run_refusals(ctx: mosaic.Context, rows: list[dict]) -> int:
    failed = 0
    for label, module_kw, forward_kw, phrase in _refusals(ctx.sp_size):
        module_kw = dict(module_kw)
        dtype = module_kw.pop("dtype", torch.bfloat16)
        embed = module_kw.pop("embed_dim", 128)
        length = module_kw.pop("length", 16 * ctx.sp_size)
        attn = mosaic.MultiAxisAttention(embed, 2, 1, backend=ENGINE, device=ctx.device, dtype=dtype, **module_kw)
        x = torch.randn(2, length, embed, device=ctx.device, dtype=dtype)
        x = ctx.shard(x, 1, module_kw.get("layout", "contiguous"))
        try:
            attn(x, **forward_kw)
            status = "FAIL: ran"
        except mosaic.BackendNotSupported as exc:
            status = "ok" if phrase in str(exc) else f"FAIL: {phrase!r} not in {exc}"
        rows.append({"P": ctx.sp_size, "case": f"refuses {label}", "status": status})
        failed += status != "ok"
    return failed


def _print(rows: list[dict]) -> None:
    head = f"{'P':>2s} {'case':26s} {'dtype':8s}"
    cols = "".join(f" {k + ' err/limit':>19s} {'ring':>8s}" for k in KEYS)
    print(f"{head}{cols}  status")
    for r in rows:
        if "out" not in r:
            print(f"{r['P']:2d} {r['case']:26s} {r.get('dtype', ''):8s} {r['status']}")
            continue
        cells = "".join(
            f" {r[k]:9.2e}/{r['limits'][k]:9.2e} {r['ring'][k]:8.1e}" if k in r else f" {'-':>19s} {'-':>8s}"
            for k in KEYS
        )
        print(f"{r['P']:2d} {r['case']:26s} {r['dtype']:8s}{cells}  {r['status']}")


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist_name in ("flash-attn", "ring-flash-attn", "transformers"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            out[dist_name] = "not installed"
    return out


def _top_level_import() -> str:
    """Whether ``import ring_flash_attn`` works here (Mosaic does not need it to)."""
    try:
        import ring_flash_attn  # noqa: F401
    except Exception as exc:
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return "works"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    # Our own process group, so Mosaic can be set up twice (sp = world, then sp = 1).
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=TIMEOUT)
    world = dist.get_world_size()
    rows: list[dict] = []
    ctx = mosaic.init(sp_size=world, timeout=TIMEOUT)
    mosaic.MultiAxisAttention(128, 2, 1, backend=ENGINE)
    early = sorted(m for m in sys.modules if m.split(".")[0] in ("flash_attn", "ring_flash_attn"))
    failed = len(early)
    rows.append({"P": world, "case": "lazy import", "status": "ok" if not early else f"FAIL: imported {early}"})
    failed += _run_cases(ctx, rows)
    failed += _run_refusals(ctx, rows)
    mosaic.shutdown()
    # One rank per sp group: ring-flash-attn then passes blocks to itself.
    ctx = mosaic.init(sp_size=1, timeout=TIMEOUT)
    failed += _run_cases(ctx, rows)
    mosaic.shutdown()
    flag = torch.tensor([failed], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        info = {**_versions(), "device": torch.cuda.get_device_name(), "world": world}
        info["import ring_flash_attn"] = _top_level_import()
        print("  ".join(f"{k}: {v}" for k, v in info.items()))
        _print(rows)
        for r in rows:
            if "traceback" in r:
                print(f"--- {r['case']} (P={r['P']}) ---\n{r['traceback']}")
        name = f"ring_flash_attn_P{world}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
        print(f"{int(flag.item())} failed (max over ranks); wrote {name}")
    dist.destroy_process_group()
    return 1 if flag.item() else 0


if __name__ == "__main__":
    sys.exit(main())
