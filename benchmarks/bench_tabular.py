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

Each case: one warm-up (``--warmup first``: only before its first row count),
then the median of ``--repeats`` timed runs (CUDA synchronised), peak memory
``torch.cuda.max_memory_allocated`` (reset per case). A case stops at its first out-of-memory (larger row counts are not
tried) and at ``--case-limit`` seconds: an alarm interrupts a run past it, and a
row count whose time predicted from the last (quadratic) exceeds it is skipped.
Under torchrun the own paths run only at P = 1; the mosaic rows report the
slowest rank and the largest peak. Prints a table and writes JSON (``--out``).

On the GPU machine (no package index; wheels in ``.whl_tabular/``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/tab .whl_tabular/*.whl
    export PYTHONPATH=/tmp/tab:$PYTHONPATH
    python3 -m pip install -q --no-deps --no-build-isolation \
        -e packages/mosaic-core -e packages/mosaic-ring -e packages/mosaic-tabular
    python3 benchmarks/bench_tabular.py --out tabular.json                                  # P = 1
    torchrun --nproc_per_node=4 benchmarks/bench_tabular.py --out tabular_p4.json           # P = 4

Tiny on CPU: ``python benchmarks/bench_tabular.py --device cpu --rows 2000 --features 20``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
            fn()
            sync(device)
            if i or not warm_up:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_gib": peak}


def table(rows: int, features: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = torch.randint(0, 10, (rows // 2,), generator=g).float()
    return x.to(device), y.to(device)


def tabpfn_case(name: str, args, ctx, rows: int) -> Callable[[], object]:
    from tabpfn.architectures.interface import PerformanceOptions

    from mosaic_tabular.rows import RowSplit
    from mosaic_tabular.tabpfn import build_random_tabpfn, shard_tabpfn

    model, _ = build_random_tabpfn("tabpfn_v2_6")
    model = model.to(ctx.device)
    x, y = table(rows, args.features, ctx.device)
    options = PerformanceOptions(save_peak_memory_factor=8 if name.endswith("memory_saving") else None)
    if name.startswith("tabpfn/mosaic"):
        shard_tabpfn(model, args.backend)
        split = RowSplit.of(rows, y.shape[0])
        x, y = split.take(x, 0), split.take_train(y, 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), autocast:
            return model(x[:, None], y[:, None], performance_options=options)

    return forward


def tabicl_case(name: str, args, ctx, rows: int) -> Callable[[], object]:
    from tabicl._model.inference_config import InferenceConfig

    from mosaic_tabular.rows import RowSplit
    from mosaic_tabular.tabicl import build_random_tabicl, shard_tabicl

    model, _ = build_random_tabicl()
    model = model.to(ctx.device)
    x, y = table(rows, args.features, ctx.device)
    if name.endswith("offload"):
        config = InferenceConfig(**{k: {"offload": "cpu"} for k in ("COL_CONFIG", "ROW_CONFIG", "ICL_CONFIG")})
    else:
        config = InferenceConfig()
    if name.startswith("tabicl/mosaic"):
        shard_tabicl(model, args.backend)
        split = RowSplit.of(rows, y.shape[0])
        x, y = split.take(x, 0), split.take_train(y, 0)

    def forward():
        with torch.no_grad():
            return model(x[None], y[None], inference_config=config)

    return forward


def gathered(ctx, result: dict) -> dict:
    """The slowest rank's time and the largest peak (every rank's values the same under torchrun)."""
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
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    ctx = mosaic.init(device=args.device)
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
                    result = gathered(ctx, run_case(build(name, args, ctx, rows), ctx.device, args.repeats,
                                                    args.case_limit, bool(warm)))  # fmt: skip
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
                    "torch": torch.__version__, "versions": versions(), "backend": args.backend}  # fmt: skip
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
