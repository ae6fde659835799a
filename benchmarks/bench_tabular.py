"""TabPFN v2.6 and TabICL forward on big tables: Mosaic's sharded rows against each package's own paths.

One run, side by side, for each row count (half training rows, half test rows,
``--features`` features, one table), random weights (tabpfn 9.2's default
TabPFN-v2.6 configuration; TabICL's default ``TabICL()``), ``torch.no_grad``:

- ``tabpfn/own``: the package's forward (bf16 autocast on CUDA, as its estimators run it);
- ``tabpfn/memory_saving``: the same with ``PerformanceOptions(save_peak_memory_factor=8)``
  (what the estimators' ``memory_saving_mode`` sets);
- ``tabpfn/mosaic``: the model after ``mosaic_tabular.tabpfn.shard_tabpfn`` on this rank's rows;
- ``tabpfn/mosaic_memory_saving``: the same with the package's ``memory_saving`` options;
- ``tabicl/own``: ``TabICL()``'s forward with its default inference manager (AMP, offload "auto");
- ``tabicl/offload``: the same with its outputs offloaded to CPU (``offload="cpu"`` in every manager);
- ``tabicl/mosaic``: the model after ``mosaic_tabular.tabicl.shard_tabicl``, on this rank's rows;
- ``tabicl/mosaic_offload``: the same with the package's CPU offloading.

Each case: one warm-up at each row count (``--warmup first``: only before its first; a first call at a new
size pays one-time costs, for TabICL's offloading most likely pinning host memory for its outputs, that a
later case at that size does not), then the median of ``--repeats`` timed runs (CUDA synchronised), peak memory
``torch.cuda.max_memory_allocated`` (reset per case) and, at P = 1, the output's mean absolute value (two
paths that did the same work agree). A case stops at its first out-of-memory (larger row counts are not
tried) and at ``--case-limit`` seconds: an alarm interrupts a run past it, and a
row count whose time predicted from the last (quadratic) exceeds it is skipped.
Under torchrun the own paths run only at P = 1; the mosaic rows report the
slowest rank and the largest peak. Prints a table and writes JSON (``--out``); ``--profile DIR`` adds, per
case, one call under ``torch.profiler`` and its operator tables.

On the GPU machine (no package index; wheels in ``.whl_tabular/``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/tab .whl_tabular/*.whl
    export PYTHONPATH=/tmp/tab:$PYTHONPATH
    python3 -m pip install -q --no-deps --no-build-isolation \
        -e packages/mosaic-core -e packages/mosaic-ring -e packages/mosaic-tabular
    python3 benchmarks/bench_tabular.py --out tabular.json                                  # P = 1
    torchrun --nproc_per_node=4 benchmarks/bench_tabular.py --out tabular_p4.json           # P = 4
    python3 benchmarks/bench_tabular.py --tabpfn-layers 1 --rows 1150000 --cases tabpfn/own  # memory ceiling
    torchrun --nproc_per_node=4 benchmarks/bench_tabular.py --one-gpu --cases tabpfn/mosaic  # memory a rank at P = 4

Tiny on CPU: ``python benchmarks/bench_tabular.py --device cpu --rows 2000 --features 20``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import mosaic

CASES = (
    "tabpfn/own", "tabpfn/memory_saving", "tabpfn/mosaic", "tabpfn/mosaic_memory_saving",
    "tabicl/own", "tabicl/offload", "tabicl/mosaic", "tabicl/mosaic_offload",
)  # fmt: skip


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in this thread once ``seconds`` have passed (between Python statements)."""

    def expire(signum, frame):
        raise CaseTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(fn: Callable[[], object], device: torch.device, repeats: int, limit: float, warm_up: bool = True) -> dict:
    """A warm-up (unless ``warm_up`` is False) and ``repeats`` timed calls of ``fn`` within ``limit`` seconds;
    seconds and peak GiB."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with time_limit(limit):
        for i in range(repeats + int(warm_up)):
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            if i or not warm_up:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # What this rank computed, to see that two paths did the same work (equal with the same kernels).
    return {"seconds": statistics.median(times), "peak_gib": peak, "output_abs_mean": out.float().abs().mean().item()}


def profile_case(fn: Callable[[], object], device: torch.device, path: str) -> None:
    """One more call of ``fn`` under ``torch.profiler``: the operators by host and by device time, to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    with open(path, "w") as f:
        for key in sorts:
            f.write(f"by {key}\n{averages.table(sort_by=key, row_limit=20)}\n")


def table(
    rows: int, features: int, device: torch.device, sharded: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole table (half training rows), or this rank's rows of it: only those go to ``device``."""
    from mosaic_tabular.rows import RowSplit

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = torch.randint(0, 10, (rows // 2,), generator=g).float()
    if sharded:
        split = RowSplit.of(rows, y.shape[0])
        x, y = split.take(x, 0), split.take_train(y, 0)
    return x.to(device), y.to(device)


def tabpfn_case(name: str, args, ctx, rows: int) -> Callable[[], object]:
    from tabpfn.architectures.interface import PerformanceOptions

    from mosaic_tabular.tabpfn import build_random_tabpfn, shard_tabpfn

    depth = {} if args.tabpfn_layers is None else {"nlayers": args.tabpfn_layers}
    model, _ = build_random_tabpfn("tabpfn_v2_6", **depth)
    model = model.to(ctx.device)
    x, y = table(rows, args.features, ctx.device, sharded=name.startswith("tabpfn/mosaic"))
    options = PerformanceOptions(save_peak_memory_factor=8 if name.endswith("memory_saving") else None)
    if name.startswith("tabpfn/mosaic"):
        shard_tabpfn(model, args.backend)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), autocast:
            return model(x[:, None], y[:, None], performance_options=options)

    return forward


def tabicl_case(name: str, args, ctx, rows: int) -> Callable[[], object]:
    from tabicl._model.inference_config import InferenceConfig

    from mosaic_tabular.tabicl import build_random_tabicl, shard_tabicl

    model, _ = build_random_tabicl()
    model = model.to(ctx.device)
    x, y = table(rows, args.features, ctx.device, sharded=name.startswith("tabicl/mosaic"))
    if name.endswith("offload"):
        config = InferenceConfig(**{k: {"offload": "cpu"} for k in ("COL_CONFIG", "ROW_CONFIG", "ICL_CONFIG")})
    else:
        config = InferenceConfig()
    if name.startswith("tabicl/mosaic"):
        shard_tabicl(model, args.backend)

    def forward():
        with torch.no_grad():
            return model(x[None], y[None], inference_config=config)

    return forward


def gathered(ctx, result: dict) -> dict:
    """The slowest rank's time and the largest peak (every rank's values the same under torchrun); the output's
    mean only at P = 1, where it is the whole output (the own paths run only there)."""
    if ctx.sp_size == 1:
        return result
    ms = mosaic.sharded.agree(round(result["seconds"] * 1e6), "max")
    peak = result["peak_gib"]
    kib = mosaic.sharded.agree(0 if peak is None else round(peak * 2**20), "max")
    return {"seconds": ms / 1e6, "peak_gib": None if peak is None else kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 100_000, 300_000])
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--backend", default="auto", help="Mosaic's strategy over rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case-limit", type=float, default=240.0, help="seconds one case may take")
    parser.add_argument(
        "--warmup",
        choices=("each", "first"),
        default="each",
        help="warm up before every row count, or only before a case's first (its kernels compiled)",
    )
    parser.add_argument(
        "--tabpfn-layers",
        type=int,
        default=None,
        help="TabPFN's depth (default: the architecture's 24). Peak memory is one layer's, so a shallow model finds "
        "the row count where a path runs out of memory at 1/24 of the time",
    )
    parser.add_argument(
        "--one-gpu",
        action="store_true",
        help="under torchrun, every rank on GPU 0 over gloo (CUDA tensors staged through the host): the memory "
        "each rank needs at P ranks, on a machine of one GPU (times are not those of P GPUs)",
    )
    parser.add_argument("--profile", default=None, help="folder: after timing, one call of each case profiled")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    sp_size = int(os.environ.get("WORLD_SIZE", "1"))  # every rank shares the rows (no data parallelism here)
    if args.one_gpu:
        ctx = mosaic.init(sp_size, backend="gloo", device="cuda:0")
    else:
        ctx = mosaic.init(sp_size, device=args.device)
    cases = [c for c in args.cases if "/mosaic" in c or ctx.sp_size == 1]
    results, stopped, last = [], set(), {}
    for rows in sorted(args.rows):
        for name in cases:
            record = {"case": name, "rows": rows, "features": args.features, "sp_size": ctx.sp_size}
            prev = last.get(name)
            warm = int(args.warmup == "each" or prev is None)
            if name in stopped:
                record["skipped"] = "out of memory or over the limit at fewer rows"
            elif prev and prev[1] * (rows / prev[0]) ** 2 * (args.repeats + warm) > args.case_limit:
                record["skipped"] = f"predicted over {args.case_limit:.0f} s"
            else:
                try:
                    build = tabpfn_case if name.startswith("tabpfn") else tabicl_case
                    forward = build(name, args, ctx, rows)
                    result = gathered(ctx, run_case(forward, ctx.device, args.repeats, args.case_limit, bool(warm)))
                    if args.profile:
                        os.makedirs(args.profile, exist_ok=True)
                        where = f"{name.replace('/', '_')}_{rows}_rank{ctx.rank}.txt"
                        profile_case(forward, ctx.device, os.path.join(args.profile, where))
                    record.update(result)
                    last[name] = (rows, result["seconds"])
                except torch.OutOfMemoryError:
                    record["error"] = "out of memory"
                    stopped.add(name)
                except CaseTimeout as exc:
                    record["error"] = str(exc)
                    stopped.add(name)
            results.append(record)
            if ctx.rank == 0:
                print_row(record)
    largest = {n: max((r["rows"] for r in results if r["case"] == n and "seconds" in r), default=0) for n in cases}
    if ctx.rank == 0:
        print("largest rows run:", ", ".join(f"{n} {v}" for n, v in largest.items()))
        if args.out:
            meta = {"device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "versions": versions(), "backend": args.backend,
                    "tabpfn_layers": args.tabpfn_layers, "one_gpu": args.one_gpu}  # fmt: skip
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results, "largest_rows": largest}, f, indent=2)
    mosaic.shutdown()


def print_row(r: dict) -> None:
    if "seconds" in r:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        what = f"{r['seconds']:8.2f} s  {peak}"
    else:
        what = r.get("error") or r.get("skipped")
    print(f"{r['case']:22s} rows {r['rows']:>9,d} x {r['features']}  P={r['sp_size']}  {what}", flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tabpfn", "tabicl", "mosaic-core", "mosaic-ring", "mosaic-tabular"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
