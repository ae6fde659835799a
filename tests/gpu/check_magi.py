"""GPU checks of the ``magi`` engine (MagiAttention under Mosaic), under torchrun with NCCL.

    torchrun --nproc_per_node=P tests/gpu/check_magi.py [--out DIR]            # correctness
    torchrun --nproc_per_node=1 tests/gpu/check_magi.py --bench [--out DIR]    # timings, one GPU
    torchrun --nproc_per_node=1 tests/gpu/check_magi.py --ffa-kernel [--out DIR]  # local(kernel="ffa")
    torchrun --nproc_per_node=1 tests/gpu/check_magi.py --kernel fa4 [--out DIR]   # local(kernel="fa4")

Needs MagiAttention (docs/magi.md) on Hopper. Correctness: every standard
conformance case the engine declares it runs (``mosaic.testing.STANDARD_CASES``)
and larger ones (head dims 24 -> 64, 64, 128; ``kv_len``, causal, zigzag, GQA,
uneven shards, fp16, batch' 70000) in bf16 against ``local`` on the unsharded
tensor in fp32 (output, input and kv gradients, parameter gradients summed over
the sp group), next to the error of single-GPU ``local`` in bf16 (cuDNN); a case
passes when each error is at most ``max(FACTOR x that error, FLOOR)``; the
median ratio is printed. Then the engine must refuse what it can't run with
the right reason, its plans must have kept Mosaic's layout (MagiAttention's position ids of the local tokens are this
rank's block of the packed sequence), and building a module must not have
imported MagiAttention. ``--bench``: forward + backward in bf16 on DESIGN.md
§6's shapes and nanoTabPFN's row attention, cuDNN (``local``) next to
``local`` with ``kernel="ffa"`` (Mosaic's contract: (B, H, L, d) in and out, packed
and padded per call), the ``magi`` backend, and FFA called directly on inputs
already packed and padded (one q/k range per batch' entry); time and peak memory. Prints tables on rank 0,
writes JSON, exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mosaic
from mosaic.testing import cases_for, compare_with_local

ENGINE = "magi"
# The max error of two correct bf16 kernels on one small random case differs by up to ~1.8 x (Mosaic's own
# strategies against local, CPU bf16): a case fails past 2 x; the median ratio over all cases says "no worse".
FACTOR, FLOOR = 2.0, 1e-3
KEYS = ("out", "dx", "dkv", "params")
TIMEOUT = timedelta(seconds=120)


def _cases() -> list[tuple[str, dict]]:
    """(label, kwargs for compare_with_local), beyond the standard conformance cases."""
    n = 1024
    zigzag = {"causal": True, "layout": "zigzag"}
    return [
        ("row d24 kv_len", dict(shape=(2, n, 3, 96), attention_axis=1, num_heads=4, kv_len=n // 2)),
        ("features d24", dict(shape=(2, 3, n, 96), attention_axis=2, num_heads=4)),
        ("full d64", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2)),
        ("full d128", dict(shape=(1, 2 * n, 2, 256), attention_axis=1, num_heads=2)),
        ("causal d64", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, causal=True)),
        ("causal zigzag d64", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, **zigzag)),
        ("causal kv_len d128", dict(shape=(1, 2 * n, 2, 256), attention_axis=1, num_heads=2, causal=True, kv_len=700)),
        ("gqa 4/2 kv_len", dict(shape=(2, n, 3, 256), attention_axis=1, num_heads=4, num_kv_heads=2, kv_len=333)),
        ("mqa 4/1 causal", dict(shape=(2, n, 3, 256), attention_axis=1, num_heads=4, num_kv_heads=1, causal=True)),
        ("uneven 1021", dict(shape=(2, 1021, 3, 96), attention_axis=1, num_heads=4, kv_len=600)),
        ("fp16 kv_len", dict(shape=(2, n, 3, 128), attention_axis=1, num_heads=2, kv_len=300, dtype=torch.float16)),
        ("batch' 70000", dict(shape=(70000, 16, 64), attention_axis=1, num_heads=1, kv_len=9)),
    ]


def _refusals() -> list[tuple[str, dict, dict, str]]:
    """(label, module kwargs, forward kwargs, phrase the BackendNotSupported message must contain)."""
    return [
        ("fp32", dict(dtype=torch.float32), {}, "dtype torch.float32 not supported"),
        ("head dim 192", dict(embed_dim=384), {}, "head dim 192 > 128"),
        ("dropout", dict(dropout=0.1), {}, "attention dropout (0.1) not supported"),
        ("cross-attention", {}, dict(kv_length=8), "cross-attention"),
    ]


def _judge(errors: dict[str, float]) -> tuple[float, dict[str, float]]:
    limits = {k: max(FACTOR * errors[f"local_{k}"], FLOOR) for k in KEYS if k in errors}
    return max(errors[k] / limits[k] for k in limits), limits


def _run_cases(
    ctx: mosaic.Context, rows: list[dict], backend: str = ENGINE, options: dict | None = None, baseline_kernel=None
) -> int:
    failed = 0
    kept, skipped = cases_for(backend, ctx.sp_size)
    standard = [
        (f"std: {c.name}", dict(shape=c.shape, attention_axis=c.axis, num_heads=c.num_heads,
                                num_kv_heads=c.num_kv_heads, kv_len=c.kv_len_for(ctx.sp_size), causal=c.causal,
                                layout=c.layout))
        for c in kept
    ]  # fmt: skip
    for name, why in skipped.items():
        rows.append({"P": ctx.sp_size, "case": f"std: {name}", "status": f"skipped: {why[0][:80]}"})
    for label, kwargs in standard + _cases():
        kwargs = dict(kwargs)
        dtype = kwargs.pop("dtype", torch.bfloat16)
        row: dict = {"P": ctx.sp_size, "case": label, "dtype": str(dtype)[6:]}
        try:
            start = time.perf_counter()
            errors = compare_with_local(
                backend, **kwargs, backend_options=options, dtype=dtype, reference_dtype=torch.float32,
                baseline_kernel=baseline_kernel,
            )  # fmt: skip
            row["seconds"] = round(time.perf_counter() - start, 2)
        except Exception as exc:  # report the case and go on; every rank raises alike
            row.update(status=f"ERROR {type(exc).__name__}: {exc}".splitlines()[0][:200])
            row["traceback"] = traceback.format_exc()
            failed += 1
            rows.append(row)
            continue
        worst, limits = _judge(errors)
        ratios = {k: errors[k] / max(errors[f"local_{k}"], 1e-12) for k in limits}
        row.update(errors, limits=limits, vs_cudnn=ratios, ratio=worst, status="ok" if worst <= 1 else "FAIL")
        failed += worst > 1
        rows.append(row)
    return failed


def _run_refusals(ctx: mosaic.Context, rows: list[dict]) -> int:
    failed = 0
    for label, module_kw, forward_kw, phrase in _refusals():
        module_kw = dict(module_kw)
        dtype = module_kw.pop("dtype", torch.bfloat16)
        embed = module_kw.pop("embed_dim", 128)
        attn = mosaic.MultiAxisAttention(embed, 2, 1, backend=ENGINE, device=ctx.device, dtype=dtype, **module_kw)
        x = ctx.shard(torch.randn(2, 16 * ctx.sp_size, embed, device=ctx.device, dtype=dtype), 1)
        kv_length = forward_kw.pop("kv_length", None)
        kv = (
            None
            if kv_length is None
            else ctx.shard(torch.randn(2, kv_length * ctx.sp_size, embed, device=ctx.device, dtype=dtype), 1)
        )
        try:
            attn(x, kv, **forward_kw)
            status = "FAIL: ran"
        except mosaic.BackendNotSupported as exc:
            status = "ok" if phrase in str(exc) else f"FAIL: {phrase!r} not in {exc}"
        rows.append({"P": ctx.sp_size, "case": f"refuses {label}", "status": status})
        failed += status != "ok"
    return failed


def _check_layout_kept(ctx: mosaic.Context, rows: list[dict]) -> int:
    """Every built MagiAttention runtime hands this rank exactly its block of the packed sequence."""
    from mosaic_magi import MagiPlan

    plans = [p for p in ctx.plans.values() if isinstance(p, MagiPlan) and "mgr" in p._runtime]
    bad = []
    for plan in plans:
        mgr = plan.manager()
        got = mgr.get_position_ids().cpu()
        block = plan.mask.block
        # MagiAttention clamps the ids of trailing pad rows to its last valid token.
        want = torch.arange(ctx.sp_rank * block, (ctx.sp_rank + 1) * block).clamp(
            max=mgr.dispatch_meta_q.max_valid_ids - 1
        )
        if not torch.equal(got.to(want.dtype), want):
            bad.append(f"batch' {plan.problem.batch} rows {plan.mask.rows}: {got[:4].tolist()}...")
    status = "ok" if plans and not bad else f"FAIL: {len(plans)} plans, wrong: {bad[:3]}"
    rows.append({"P": ctx.sp_size, "case": f"layout kept ({len(plans)} runtimes)", "status": status})
    return status != "ok"


def _print(rows: list[dict]) -> None:
    print(f"{'P':>2s} {'case':44s} {'dtype':8s}" + "".join(f" {k + ' err/limit':>19s} {'xcuDNN':>6s}" for k in KEYS))
    for r in rows:
        if "out" not in r:
            print(f"{r['P']:2d} {r['case']:44s} {r.get('dtype', ''):8s} {r['status']}")
            continue
        cells = "".join(
            f" {r[k]:9.2e}/{r['limits'][k]:9.2e} {r['vs_cudnn'][k]:6.2f}" if k in r else f" {'-':>19s} {'-':>6s}"
            for k in KEYS
        )
        print(f"{r['P']:2d} {r['case']:44s} {r['dtype']:8s}{cells}  {r['status']}")
    ratios = sorted(x for r in rows for x in r.get("vs_cudnn", {}).values())
    if ratios:
        median = ratios[len(ratios) // 2]
        print(f"error / cuDNN's over {len(ratios)} errors: median {median:.2f}, max {ratios[-1]:.2f}")


# --- timings -------------------------------------------------------------------------------------------------------


def _time(fn, reps: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` (forward + backward), after one warm-up call, and its peak GiB above
    what was allocated before."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def _mosaic_step(
    backend: str, q, k, v, grad, kv_len: int | None, ctx: mosaic.Context, options: dict | None = None
) -> Callable[[], None]:
    def run() -> None:
        mosaic.attention(q, k, v, backend=backend, options=options, kv_len=kv_len, context=ctx).backward(grad)

    return run


def _ffa_inputs(q, k, v, grad, kv_len: int | None) -> tuple:
    """FFA's inputs ``(batch' x N, heads, d_pad)``: entry i's queries ``[iN, (i+1)N)`` see ``[iN, iN + kv_len)``."""
    b, h, n, d = q.shape
    dp = 64 if d <= 64 else 128
    qf, kf, vf, gf = (F.pad(t.detach().transpose(1, 2), (0, dp - d)).reshape(b * n, h, dp) for t in (q, k, v, grad))
    starts = torch.arange(b, device=q.device, dtype=torch.int32) * n
    q_ranges = torch.stack([starts, starts + n], 1)
    k_ranges = torch.stack([starts, starts + (n if kv_len is None else kv_len)], 1)
    return qf.requires_grad_(), kf.requires_grad_(), vf.requires_grad_(), gf, q_ranges, k_ranges


def _ffa_step(ffa, qf, kf, vf, gf, q_ranges, k_ranges, scale: float) -> Callable[[], None]:
    def run() -> None:
        ffa(qf, kf, vf, q_ranges, k_ranges, softmax_scale=scale)[0].backward(gf)

    return run


def _bench(ctx: mosaic.Context) -> list[dict]:
    """cuDNN (local), the magi backend and FFA directly, bf16 forward + backward, one GPU."""
    from magi_attention.api import flex_flash_attn_func as ffa

    shapes = [  # (label, batch', heads, N, d, kv_len)
        ("nanoTabPFN rows", 11, 4, 150_000, 24, 75_000),
        ("(5,4,65536,24)", 5, 4, 65_536, 24, None),
        ("(5,4,262144,24)", 5, 4, 262_144, 24, None),
        ("(160,4,16384,24)", 160, 4, 16_384, 24, None),
        ("(1,16,65536,128)", 1, 16, 65_536, 128, None),
    ]
    out = []
    for label, b, h, n, d, kv_len in shapes:
        reps = 2 if n * n * b > 1e11 else 3
        torch.manual_seed(0)
        q, k, v, grad = (torch.randn(b, h, n, d, device=ctx.device, dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        packed = _ffa_inputs(q, k, v, grad, kv_len)
        row = {
            "shape": label,
            "batch'": b,
            "heads": h,
            "N": n,
            "d": d,
            "kv_len": kv_len,
            "ffa_head_dim": packed[0].shape[-1],
        }
        steps = {
            "cudnn": _mosaic_step("local", q, k, v, grad, kv_len, ctx),
            "ffa_kernel": _mosaic_step("local", q, k, v, grad, kv_len, ctx, {"kernel": "ffa"}),
            "magi": _mosaic_step("magi", q, k, v, grad, kv_len, ctx),
            "ffa": _ffa_step(ffa, *packed, d**-0.5),
        }
        for name, fn in steps.items():
            try:
                ms, gib = _time(fn, reps)
                row[f"{name}_ms"], row[f"{name}_peak_gib"] = round(ms, 1), round(gib, 3)
            except Exception as exc:
                row[f"{name}_ms"] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
        try:
            with torch.no_grad():  # FFA's output against cuDNN's on this shape
                ref = mosaic.attention(q, k, v, backend="local", kv_len=kv_len, context=ctx).float()
                y = ffa(*packed[:3], *packed[4:], softmax_scale=d**-0.5)[0]
                y = y.reshape(b, n, h, -1)[..., :d].transpose(1, 2).float()
                row["ffa_vs_cudnn_max_abs"] = float((y - ref).abs().max())
        except Exception as exc:
            row["ffa_vs_cudnn_max_abs"] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        out.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, grad, packed, steps
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--bench", action="store_true", help="timings instead of correctness")
    parser.add_argument("--ffa-kernel", action="store_true", help="the cases on local with kernel='ffa' (one GPU)")
    parser.add_argument("--kernel", default=None, help="the cases on local with this kernel (one GPU), e.g. fa4")
    args = parser.parse_args()
    if args.ffa_kernel:
        args.kernel = "ffa"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=TIMEOUT)
    world = dist.get_world_size()
    ctx = mosaic.init(sp_size=world, timeout=TIMEOUT)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "world": world}
    try:
        info["magi_attention"] = version("magi_attention")
    except PackageNotFoundError:
        info["magi_attention"] = "not installed"
    if args.bench:
        rows = _bench(ctx)
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, "magi_bench.json"), "w") as f:
                json.dump({**info, "rows": rows}, f, indent=1)
        dist.destroy_process_group()
        return 0
    rows: list[dict] = []
    failed = 0
    if args.kernel:  # local with the named kernel on the whole tensor, the same cases, against cuDNN's errors
        failed += _run_cases(ctx, rows, "local", {"kernel": args.kernel}, baseline_kernel="cudnn")
    else:
        mosaic.MultiAxisAttention(128, 2, 1, backend=ENGINE)
        early = sorted(m for m in sys.modules if m.split(".")[0] == "magi_attention")
        rows.append({"P": world, "case": "lazy import", "status": "ok" if not early else f"FAIL: imported {early}"})
        failed += bool(early)
        failed += _run_cases(ctx, rows)
        failed += _run_refusals(ctx, rows)
        failed += _check_layout_kept(ctx, rows)
    flag = torch.tensor([failed], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("  ".join(f"{k}: {v}" for k, v in info.items()))
        _print(rows)
        for r in rows:
            if "traceback" in r:
                print(f"--- {r['case']} (P={r['P']}) ---\n{r['traceback']}")
        name = f"{args.kernel}_kernel_P1.json" if args.kernel else f"magi_P{world}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
        print(f"{int(flag.item())} failed (max over ranks); wrote {name}")
    dist.destroy_process_group()
    return 1 if flag.item() else 0


if __name__ == "__main__":
    sys.exit(main())
