"""Sequence-parallel attention benchmark: Mosaic strategies vs the best 1-GPU kernel vs torch CP.

    torchrun --nproc_per_node=4 benchmarks/bench_sp.py [--out DIR] [--shapes ...] [--quick]

All numbers come from one run on one machine, bf16, forward + backward,
median of repeats timed with CUDA events (rank 0's clock after a barrier):

- ``1gpu_cudnn`` / ``1gpu_flash``: ``F.scaled_dot_product_attention`` on the
  whole problem on one GPU (every rank runs it on its own GPU at once, as the
  baseline script in shared/bench did), and ``1gpu_fa4``: FlashAttention-4's
  ``flash_attn_func`` where flash-attn-4 is installed; ``ideal = best 1-GPU / P``.
- ``--kernels auto cudnn`` times every strategy on Mosaic's kernel choice and
  with every block on cuDNN (``MOSAIC_KERNEL=cudnn``), side by side.
- Mosaic strategies: ``mosaic.attention`` on this rank's shard in the
  canonical layout (no projections; the guard's agreement and the cached plan
  included), as installed: ring, allgather, mesh2d, ulysses, composed,
  hierarchical, ring_flash_attn, switch, magi, auto. Bytes received per rank
  are measured with ``mosaic.comm.count_traffic``.
- ``torchCP_cudnn`` / ``torchCP_flash``: PyTorch's ``context_parallel``
  (all-gather rotation, load balancing off: it refuses non-causal otherwise).
  In the key-prefix case it gets the train rows as separate, evenly sharded K/V.
- Peak memory per GPU of ``ring`` at N, 2N and 4N rows (it should grow as N/P).
- Bytes each rank receives from ranks outside its simulated node of ``NODE_SIZE``
  GPUs (measured: the flat strategies against ``hierarchical``).

Prints a table and writes ``bench_sp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _timing import fwd_bwd_ms, gpu_name
from torch.nn.attention import SDPBackend, sdpa_kernel

import mosaic
from mosaic.comm import count_traffic

NODE_SIZE = 2


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    length: int
    head_dim: int
    kv_len: int | None = None  # key prefix (TabPFN train rows)


SHAPES = [
    Shape("tabpfn_b5_L64k", 5, 4, 65536, 24),
    Shape("tabpfn_b5_L256k", 5, 4, 262144, 24),
    Shape("tabpfn_b160_L16k", 160, 4, 16384, 24),
    Shape("llm_b1_h16_L64k", 1, 16, 65536, 128),
    Shape("tabpfn_prefix_b5_L256k", 5, 4, 262144, 24, kv_len=131072),
]


def _strategies(world: int) -> dict[str, dict]:
    """Mosaic variants: backend name plus mesh_shape/options for this world size."""
    half = max(1, world // 2)
    variants = {
        "ring": {"backend": "ring"},
        "allgather": {"backend": "allgather"},
        "mesh2d": {"backend": "mesh2d", "mesh_shape": (2, half)},
        "ulysses": {"backend": "ulysses"},
        "composed(2,s)_ring": {"backend": "composed", "mesh_shape": (2, half), "options": {"seq_parallel": "ring"}},
        **{
            f"hier_L2_{inter}/{intra}": {
                "backend": "hierarchical",
                "options": {"intra_node_size": 2, "inter_node_strategy": inter, "intra_node_strategy": intra},
            }
            for inter, intra in (("ring", "ring"), ("ring", "allgather"), ("allgather", "ring"))
        },
        "ring_flash_attn": {"backend": "ring_flash_attn"},
        "switch": {"backend": "switch"},
        "magi": {"backend": "magi"},
        "auto": {"backend": "auto"},
        # allgather with a fixed number of overlapped chunks (run on request: --strategies allgather_c2 ...)
        **{f"allgather_c{n}": {"backend": "allgather", "options": {"chunks": n}} for n in (1, 2, 4, 8)},
    }
    return variants


def _default_strategies(variants: dict[str, dict]) -> list[str]:
    return [name for name in variants if not name.startswith("allgather_c")]


def _log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def _barrier() -> None:
    dist.barrier()


def _tensors(b: int, h: int, n: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]


def _one_gpu(shape: Shape, reps: int) -> dict[str, float]:
    """The whole problem on this rank's GPU, each fused SDPA backend."""
    q, k, v = _tensors(shape.batch, shape.heads, shape.length, shape.head_dim, seed=0)
    if shape.kv_len is not None:
        k, v = k[:, :, : shape.kv_len].contiguous(), v[:, :, : shape.kv_len].contiguous()
    out = {}
    for name, backend in (("1gpu_cudnn", SDPBackend.CUDNN_ATTENTION), ("1gpu_flash", SDPBackend.FLASH_ATTENTION)):

        def attn(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            out[name] = fwd_bwd_ms(attn, q, k, v, sync=_barrier, warmup=1, repeats=reps)
        except RuntimeError as exc:
            _log(f"  {name} failed: {str(exc)[:100]}")
    if not mosaic.kernels.get_kernel("fa4").unavailable(q.device):
        from flash_attn.cute import flash_attn_func

        def fa4(q, k, v):  # FlashAttention-4 itself on the (b, n, h, d) layout it takes
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0]

        out["1gpu_fa4"] = fwd_bwd_ms(fa4, q, k, v, sync=_barrier, warmup=1, repeats=reps)
    return out


def _mosaic(ctx, shape: Shape, config: dict, reps: int) -> tuple[float, int, int, float]:
    """(ms, bytes received per rank for one fwd+bwd, of them from other nodes, peak GiB) of one strategy.

    Nodes are runs of ``NODE_SIZE`` GPUs: on one host they are simulated, as mosaic-hier's tests do.
    A call is ``mosaic.attention`` as a model makes it: the guard's agreement, the cached plan, the run.
    """
    local = ctx.shard(torch.empty(shape.length, device="meta"), 0).shape[0]
    q, k, v = _tensors(shape.batch, shape.heads, local, shape.head_dim, seed=1 + ctx.rank)
    options = dict(config.get("options") or {})
    if "mesh_shape" in config:
        options["mesh_shape"] = config["mesh_shape"]

    def attn(q, k, v):
        return mosaic.attention(q, k, v, backend=config["backend"], options=options, kv_len=shape.kv_len)

    torch.cuda.reset_peak_memory_stats()
    with count_traffic() as meter:
        fwd_bwd_ms(attn, q, k, v, warmup=0, repeats=1)
    ms = fwd_bwd_ms(attn, q, k, v, sync=_barrier, warmup=1, repeats=reps)
    return ms, meter.total, meter.from_outside(NODE_SIZE, ctx.rank), torch.cuda.max_memory_allocated() / 2**30


def _auto_pick(ctx, shape: Shape) -> str:
    """The variant ``backend="auto"`` runs for this shape (from its ranking)."""
    from mosaic.auto import rank
    from mosaic.functional import Call, agreed_problem

    local = ctx.shard(torch.empty(shape.length, device="meta"), 0).shape[0]
    q = torch.empty(shape.batch, shape.heads, local, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    auto = mosaic.get_backend("auto")
    problem = agreed_problem(q, q, Call(auto, auto.parse_options({}), shape.kv_len, what="bench auto"), ctx)
    chosen = rank(problem).chosen
    return f"{chosen.backend} ({chosen.options})"


def _torch_cp(shape: Shape, kernel: SDPBackend, reps: int) -> float:
    """PyTorch's context_parallel on the same global problem (all-gather rotation, no load balancing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options
    _cp_options.enable_load_balance = False  # non-causal attention is refused otherwise
    set_rotate_method("allgather")
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    q, k, v = _tensors(shape.batch, shape.heads, shape.length, shape.head_dim, seed=0)
    if shape.kv_len is not None:
        # torch CP has no key prefix: the train rows become separate K/V, re-sharded evenly.
        k, v = k[:, :, : shape.kv_len].contiguous(), v[:, :, : shape.kv_len].contiguous()
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):

        def attn(q, k, v):
            with sdpa_kernel([kernel]):
                return F.scaled_dot_product_attention(q, k, v)

        return fwd_bwd_ms(attn, q, k, v, sync=_barrier, warmup=1, repeats=reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES])
    parser.add_argument("--strategies", nargs="*", default=None, help="Mosaic variants to run (default: installed)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-base", type=int, default=65536, help="N of the ring memory scaling rows")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the 1-GPU kernels, torch CP and ring memory (A/B runs)"
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        help="block kernels to time every strategy on (auto: Mosaic's choice; e.g. auto cudnn)",
    )
    args = parser.parse_args()
    ctx = mosaic.init(sp_size=int(os.environ["WORLD_SIZE"]))
    world = ctx.sp_size
    results: dict[str, object] = {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "world": world,
        "flash-attn-4": mosaic.kernels.fa4.installed_version() or "not installed",
    }
    strategies = _strategies(world)
    chosen = args.strategies or _default_strategies(strategies)
    runs = [(name, kernel) for name in chosen for kernel in args.kernels]
    labels = [name if len(args.kernels) == 1 else f"{name}@{kernel}" for name, kernel in runs]
    table = []
    kernels = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
    for shape in (s for s in SHAPES if s.name in args.shapes):
        _log(f"== {shape}")
        row: dict[str, object] = {"shape": shape.name}
        if not args.no_baselines:
            row.update(_one_gpu(shape, args.reps))
        torch.cuda.empty_cache()
        for (name, kernel), label in zip(runs, labels, strict=True):
            config = strategies[name]
            os.environ.pop("MOSAIC_KERNEL", None)
            if kernel != "auto":
                os.environ["MOSAIC_KERNEL"] = kernel
            try:
                ms, received, outside, peak = _mosaic(ctx, shape, config, args.reps)
            except (mosaic.BackendUnavailable, mosaic.BackendNotSupported, RuntimeError) as exc:
                _log(f"  {label}: skipped ({str(exc).splitlines()[-1].strip()[:100]})")
                continue
            finally:
                os.environ.pop("MOSAIC_KERNEL", None)
            name = label
            row[name] = ms
            row[f"{name}_bytes_recv_per_rank"] = received
            row[f"{name}_bytes_from_other_nodes"] = outside
            row[f"{name}_peak_GiB"] = peak
            _log(
                f"  {name:22s} {ms:9.2f} ms  recv {received / 2**20:9.1f} MiB  (from other {NODE_SIZE}-GPU nodes "
                f"{outside / 2**20:9.1f})  peak {peak:6.2f} GiB"
            )
            torch.cuda.empty_cache()
        for kname, kernel in () if args.no_baselines else kernels:
            try:
                row[f"torchCP_{kname}"] = _torch_cp(shape, kernel, args.reps)
            except Exception as exc:  # report the failure in the table instead of losing the run
                _log(f"  torchCP_{kname} failed: {type(exc).__name__}: {str(exc)[:160]}")
            torch.cuda.empty_cache()
        if "auto" in chosen:
            row["auto_pick"] = _auto_pick(ctx, shape)
            _log(f"  auto picks {row['auto_pick']}")
        table.append(row)
        results[shape.name] = row
    if not args.no_baselines:
        results["ring_memory"] = _ring_memory(ctx, args.memory_base)
    _print_table(table, world, labels)
    if ctx.rank == 0:
        path = os.path.join(args.out, f"bench_sp_P{world}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")
    mosaic.shutdown()


def _ring_memory(ctx, base: int) -> dict[str, float]:
    """Peak GiB per GPU of ring fwd+bwd at N, 2N, 4N rows of the (5, 4, N, 24) problem."""
    out = {}
    for factor in (1, 2, 4):
        shape = Shape(f"mem_{factor}x", 5, 4, base * factor, 24)
        torch.cuda.empty_cache()
        _, _, _, peak = _mosaic(ctx, shape, {"backend": "ring"}, reps=1)
        out[f"N={base * factor}"] = peak
        _log(f"ring memory N={base * factor}: {peak:.3f} GiB per GPU")
    return out


def _print_table(table: list[dict], world: int, strategies: list[str]) -> None:
    if dist.get_rank() != 0:
        return
    print(f"\n{'shape':24s} {'variant':22s} {'ms':>9s} {'% ideal':>8s} {'vs CP best':>10s}")
    for row in table:
        one = [row[k] for k in ("1gpu_cudnn", "1gpu_flash", "1gpu_fa4") if k in row]
        ideal = min(one) / world if one else float("nan")
        cp = [row[k] for k in ("torchCP_cudnn", "torchCP_flash") if k in row]
        cp_best = min(cp) if cp else float("nan")
        print(f"{row['shape']:24s} {'ideal (best 1-GPU / P)':22s} {ideal:9.2f}")
        for name in ("1gpu_cudnn", "1gpu_flash", "1gpu_fa4", *strategies, "torchCP_cudnn", "torchCP_flash"):
            if name in row:
                ms = row[name]
                print(f"{'':24s} {name:22s} {ms:9.2f} {100 * ideal / ms:7.1f}% {cp_best / ms:9.2f}x")
        for name in strategies:  # a strategy on Mosaic's kernels against the same strategy on cuDNN blocks
            base = name.split("@")[0]
            if name.endswith("@auto") and f"{base}@cudnn" in row and name in row:
                print(f"{'':24s} {base}: {row[f'{base}@cudnn'] / row[name]:.2f}x faster than on cuDNN blocks")
        if "auto" in row:
            measured = {name: row[name] for name in strategies if name in row and name != "auto"}
            best = min(measured, key=measured.get)
            print(
                f"{'':24s} auto picks {row.get('auto_pick')}: {row['auto'] / measured[best]:.3f}x the fastest ({best})"
            )
    rows = {row["shape"]: row for row in table}
    full, prefix = rows.get("tabpfn_b5_L256k"), rows.get("tabpfn_prefix_b5_L256k")
    if full and prefix:
        print("\nkey prefix (kv_len = N/2) speed-up over full attention, same strategy:")
        for name in (*strategies, "torchCP_cudnn", "torchCP_flash"):
            if name in full and name in prefix:
                print(f"  {name:22s} {full[name] / prefix[name]:5.2f}x")


if __name__ == "__main__":
    main()
