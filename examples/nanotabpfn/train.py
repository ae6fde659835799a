"""Train nanoTabPFN on its synthetic prior with the rows of every table sharded over processes.

One process:      python examples/nanotabpfn/train.py
Rows over 4:      torchrun --nproc_per_node=4 examples/nanotabpfn/train.py
GPUs, 150k rows:  torchrun --nproc_per_node=4 examples/nanotabpfn/train.py --rows 150000 --batch-size 1 ...
Time steps only:  ... --bench-steps 10 (prints and writes JSON)

The defaults are the demo: a small run on CPU (gloo) that learns in a few
minutes on two cores. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from nanotabpfn.bench import bench_steps
from nanotabpfn.checkpoint import load_checkpoint, save_checkpoint
from nanotabpfn.evaluate import Accuracy, iris_accuracy, synthetic_accuracy
from nanotabpfn.model import NanoTabPFN
from nanotabpfn.objective import compute_gradients
from nanotabpfn.plot import moving_average, write_accuracy_curve, write_loss_curve
from nanotabpfn.prior import PriorConfig, StepSpec, draw_spec, mix, sample
from nanotabpfn.realdata import MISSING as IRIS_MISSING
from tqdm import tqdm

import mosaic
import mosaic.cli

IRIS_CLASSES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data (the synthetic prior)")
    data.add_argument("--rows", type=int, default=200, help="rows per table, train + test (default: 200)")
    data.add_argument("--batch-size", type=int, default=8, help="tables per step and replica (default: 8)")
    data.add_argument("--features", type=int, default=5, help="at most this many features per table (default: 5)")
    data.add_argument("--classes", type=int, default=3, help="at most this many classes; the decoder's outputs")
    sharding = p.add_argument_group("sharding and devices")
    sharding.add_argument("--sp-size", type=int, default=None, help="ranks sharing one table's rows (default: all)")
    sharding.add_argument("--backend", default="allgather", help="row-attention strategy (default: allgather)")
    sharding.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --backend, repeatable: mesh_shape=2,2 (mesh2d, composed), intra_node_size=2 "
        "(hierarchical), chunks=2 (allgather); values read as ints, tuples (2,2), bools (true), strings",
    )
    sharding.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    sharding.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for cuda)"
    )
    sharding.add_argument("--checkpoint-layers", action="store_true", help="recompute each block in the backward")
    model = p.add_argument_group("model (nanoTabPFN defaults)")
    model.add_argument("--embedding-size", type=int, default=96)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--layers", type=int, default=3)
    model.add_argument("--mlp-hidden", type=int, default=192)
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=300, help="training steps in all (default: 300)")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: steps / 10)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 to disable")
    optim.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("output, checkpoints, evaluation")
    run.add_argument("--out-dir", type=Path, default=Path("runs/nanotabpfn"), help="plots, metrics, checkpoint")
    run.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    run.add_argument(
        "--resume", type=Path, default=None, help="continue from this checkpoint directory (any --sp-size)"
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this run after step N (e.g. a job's time limit); --resume later",
    )
    run.add_argument("--eval-batches", type=int, default=4, help="batches of held-out synthetic tables")
    run.add_argument("--iris-repeats", type=int, default=10, help="random half/half splits of iris to score")
    run.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (default: steps / 10; 0: at the end only)"
    )
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--bench-steps", type=int, default=0, help="time N steps on one batch instead of training")
    bench.add_argument("--bench-warmup", type=int, default=2, help="untimed steps before them")
    bench.add_argument(
        "--bench-inference", action="store_true", help="time the forward alone under no_grad (predictions)"
    )
    bench.add_argument(
        "--kernel", default=None, help="run every attention block on this kernel (MOSAIC_KERNEL), e.g. cudnn or fa4"
    )
    sharding.add_argument(
        "--inference-rows",
        type=int,
        default=None,
        help="without gradients, run each block in place: feature attention on N rows at a time, the rest by column",
    )
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, world: int, launched: bool) -> str | None:
    """The first problem with the command line, in words (``None`` when it is fine)."""
    sp = args.sp_size
    if sp < 1:
        return f"--sp-size must be at least 1, got {sp}"
    if not launched and sp > 1:
        return f"--sp-size {sp} needs {sp} processes: launch with torchrun --nproc_per_node={sp} (or a multiple)"
    if world % sp:
        return f"--sp-size {sp} does not divide the world size {world} (torchrun's processes)"
    if args.rows < max(3, sp):
        return f"--rows {args.rows} is too few: every one of the {sp} sp ranks needs a row, and a table needs 3"
    for name in ("batch_size", "features", "steps", "embedding_size", "heads", "layers", "mlp_hidden"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.classes < 2:
        return f"--classes must be at least 2, got {args.classes}"
    if args.embedding_size % args.heads:
        return f"--embedding-size {args.embedding_size} is not divisible by --heads {args.heads}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but CUDA is not available"
    if args.backend not in mosaic.available_backends():
        return f"--backend {args.backend!r} is not installed; available: {', '.join(mosaic.available_backends())}"
    try:
        backend_options(args)
    except ValueError as exc:
        return str(exc)
    if args.lr <= 0 or args.bench_steps < 0 or args.bench_warmup < 0 or args.save_every < 0:
        return "--lr must be positive; --bench-steps, --bench-warmup and --save-every must not be negative"
    if args.eval_every is not None and args.eval_every < 0:
        return f"--eval-every must not be negative, got {args.eval_every}"
    if world > 1 and importlib.util.find_spec("numpy") is None:
        return "checkpoints of several processes need numpy: pip install -r examples/nanotabpfn/requirements.txt"
    return None


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--backend-option`` as the options of ``--backend``; a ``ValueError`` in words when they are not."""
    try:
        options = mosaic.cli.parse_options(args.backend_option)
    except ValueError as exc:
        raise ValueError(f"--backend-option: {exc}") from None
    backend = mosaic.get_backend(args.backend)
    missing = mosaic.cli.missing_options(backend, options)
    if missing:
        examples = " ".join(f"--backend-option {mosaic.cli.option_example(backend, n, args.sp_size)}" for n in missing)
        raise ValueError(f"--backend {args.backend} needs option(s) {', '.join(missing)}: e.g. {examples}")
    backend.parse_options(options)  # an unknown option or a bad value raises, naming it
    return options


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``--lr``."""
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "embedding_size": args.embedding_size,
        "num_attention_heads": args.heads,
        "mlp_hidden_size": args.mlp_hidden,
        "num_layers": args.layers,
        "num_outputs": args.classes,
    }


def log(ctx: mosaic.Context, text: str) -> None:
    """A line from rank 0, above the progress bar."""
    if ctx.rank == 0:
        tqdm.write(text)


def train(args: argparse.Namespace, ctx: mosaic.Context, model: NanoTabPFN, optimizer: torch.optim.Optimizer) -> None:
    config = PriorConfig(args.rows, args.features, args.classes, args.batch_size)
    rows = ctx.sharded_dim(args.rows, dim=1)
    checkpoint = args.out_dir / "checkpoint"
    eval_every = max(1, args.steps // 10) if args.eval_every is None else args.eval_every
    start, losses, evaluations = 0, [], []
    if args.resume is not None:
        start, losses, evaluations = load_checkpoint(args.resume, model, optimizer, model_config(args))
        log(ctx, f"resumed from {args.resume} at step {start}")
    began = time.perf_counter()
    stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    # Redrawn in place on a terminal; in a log (torchrun, nox, a batch job) every redraw is kept, so fewer.
    redraw = 0.1 if sys.stderr.isatty() else 10.0
    bar = tqdm(total=args.steps, initial=start, unit="step", mininterval=redraw, disable=ctx.rank != 0)
    last: tuple[Accuracy, Accuracy | None] | None = None
    for step in range(start, stop):
        tick = time.perf_counter()
        # Replicas draw different tables; the ranks of one sp group draw their rows of the same ones.
        tables = sample(config, draw_spec(config, "train", args.seed, step, ctx.dp_rank), rows, ctx.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss = compute_gradients(model, tables, ctx, bf16=args.bf16).item()
        if args.grad_clip > 0:
            # The gradients are already summed, so every rank clips by the same norm.
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        ctx.step(step)  # the ranks agree they are at the same step (a rank that skipped one is named here)
        losses.append(loss)
        rate = args.rows * args.batch_size * ctx.dp_size / (time.perf_counter() - tick)
        bar.set_postfix(loss=f"{loss:.4f}", rows_per_s=f"{rate:,.0f}", refresh=False)
        bar.update()
        if eval_every and (step + 1) % eval_every == 0:
            last = evaluate(args, ctx, model, config)
            evaluations.append(evaluation(step + 1, *last))
            log(ctx, describe(evaluations[-1]))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(checkpoint, model, optimizer, losses, evaluations, model_config(args))
    bar.close()
    seconds = time.perf_counter() - began
    # The figures printed at the end are those of the last step, evaluated in the loop or now.
    if last is None or evaluations[-1]["step"] != len(losses):
        last = evaluate(args, ctx, model, config)
        evaluations.append(evaluation(len(losses), *last))
    synthetic, iris = last
    save_checkpoint(checkpoint, model, optimizer, losses, evaluations, model_config(args))
    if ctx.rank == 0:
        report(args, ctx, losses, evaluations, synthetic, iris, seconds, stop - start)


def evaluate(
    args: argparse.Namespace, ctx: mosaic.Context, model: NanoTabPFN, config: PriorConfig
) -> tuple[Accuracy, Accuracy | None]:
    """Held-out synthetic accuracy, and iris's (``None`` when it cannot run); every rank."""
    synthetic = synthetic_accuracy(model, config, ctx, seed=args.seed, batches=args.eval_batches, bf16=args.bf16)
    iris = None
    if args.classes >= IRIS_CLASSES:
        iris = iris_accuracy(model, ctx, seed=args.seed, repeats=args.iris_repeats, bf16=args.bf16)
    return synthetic, iris


def evaluation(step: int, synthetic: Accuracy, iris: Accuracy | None) -> dict[str, Any]:
    """One point of the accuracy curve: ``[accuracy, majority-class baseline]`` of each set."""
    return {
        "step": step,
        "synthetic": [synthetic.accuracy, synthetic.baseline],
        "iris": None if iris is None else [iris.accuracy, iris.baseline],
    }


def describe(point: dict[str, Any]) -> str:
    iris = "" if point["iris"] is None else f", iris {point['iris'][0]:.3f}"
    return f"step {point['step']}: held-out synthetic accuracy {point['synthetic'][0]:.3f}{iris}"


def report(
    args: argparse.Namespace,
    ctx: mosaic.Context,
    losses: list[float],
    evaluations: list[dict[str, Any]],
    synthetic: Accuracy,
    iris: Accuracy | None,
    seconds: float,
    steps_run: int,
) -> None:
    """Print the figures and write the plots and metrics (rank 0)."""
    window = max(1, min(20, len(losses) // 5))
    final = moving_average(losses, window)[-1] if losses else float("nan")
    print(f"final loss {final:.4f} (mean of the last {window} steps; first step {losses[0]:.4f})")
    print(f"held-out synthetic accuracy {synthetic}")
    if iris is not None:
        print(f"iris accuracy {iris}")
    elif args.classes < IRIS_CLASSES:
        print(f"iris skipped: it has 3 classes, --classes is {args.classes}")
    else:
        print(f"iris skipped: {IRIS_MISSING}")
    print(
        f"training took {seconds:.1f} s for {steps_run} steps in this run ({len(losses)} in all), evaluations included"
    )
    title = f"nanoTabPFN, {args.rows} rows over sp={ctx.sp_size} ({args.backend}), dp={ctx.dp_size}"
    loss_png, accuracy_png = args.out_dir / "loss.png", args.out_dir / "accuracy.png"
    write_loss_curve(loss_png, losses, title)
    write_accuracy_curve(accuracy_png, evaluations, title)
    metrics = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "world_size": ctx.world_size,
        "sp_size": ctx.sp_size,
        "dp_size": ctx.dp_size,
        "final_loss": final,
        "losses": losses,
        "evaluations": evaluations,
        "synthetic_accuracy": synthetic.accuracy,
        "synthetic_baseline": synthetic.baseline,
        "iris_accuracy": None if iris is None else iris.accuracy,
        "iris_baseline": None if iris is None else iris.baseline,
        "train_seconds": seconds,
    }
    (args.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {loss_png}, {accuracy_png}, {args.out_dir / 'metrics.json'} and {args.out_dir / 'checkpoint'}/")


def bench(args: argparse.Namespace, ctx: mosaic.Context, model: NanoTabPFN, optimizer: torch.optim.Optimizer) -> None:
    config = PriorConfig(args.rows, args.features, args.classes, args.batch_size)
    # Half the rows are training rows (the key prefix of row attention), every feature present.
    spec = StepSpec(seed=mix("bench", args.seed), features=args.features, train_size=max(2, args.rows // 2))
    tables = sample(config, spec, ctx.sharded_dim(args.rows, dim=1), ctx.device)
    result = bench_steps(
        model,
        optimizer,
        tables,
        ctx,
        steps=args.bench_steps,
        warmup=args.bench_warmup,
        bf16=args.bf16,
        inference=args.bench_inference,
    )
    if ctx.rank != 0:
        return
    result = {
        "rows": args.rows,
        "train_rows": spec.train_size,
        "features": spec.features,
        "batch_size": args.batch_size,
        "sp_size": ctx.sp_size,
        "dp_size": ctx.dp_size,
        "world_size": ctx.world_size,
        "backend": args.backend,
        "kernel": args.kernel or "auto",
        "bf16": args.bf16,
        "checkpoint_layers": args.checkpoint_layers,
        "inference_rows": args.inference_rows,
        "model": model_config(args),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        **result,
    }
    mode = "infer" if args.bench_inference else ("ckpt" if args.checkpoint_layers else "train")
    name = f"bench_{mode}_rows{args.rows}_sp{ctx.sp_size}_dp{ctx.dp_size}_{args.backend}_{args.kernel or 'auto'}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"wrote {args.out_dir / name}")


def fail(problem: str) -> NoReturn:
    """Stop with a usage error; every process finds the same problem and one message is enough."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train.py: error: {problem}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.sp_size = world if args.sp_size is None else args.sp_size
    problem = check_args(args, world, launched)
    if problem is not None:
        fail(problem)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    # Each process takes its own GPU; mosaic.init would pick the same one for all from a bare "cuda".
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else "cpu"
    if args.kernel:
        os.environ["MOSAIC_KERNEL"] = args.kernel
    options = backend_options(args)
    ctx = mosaic.init(sp_size=args.sp_size, device=device)
    try:
        described = ", ".join(f"{k}={mosaic.cli.format_value(v)}" for k, v in options.items())
        log(
            ctx,
            f"nanoTabPFN: world {ctx.world_size} = dp {ctx.dp_size} x sp {ctx.sp_size}, "
            f"backend {args.backend}{f' ({described})' if described else ''}, "
            f"{ctx.device}{' bf16' if args.bf16 else ''}; {args.rows} rows per table "
            f"(about {args.rows // ctx.sp_size} per rank), batches of {args.batch_size} tables",
        )
        # The same seed on every rank gives every rank the same initial weights.
        torch.manual_seed(args.seed)
        try:
            model = NanoTabPFN(
                **model_config(args),
                backend=args.backend,
                backend_options=options,
                checkpoint_layers=args.checkpoint_layers,
                inference_rows=args.inference_rows,
            ).to(ctx.device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            if args.bench_steps:
                bench(args, ctx, model, optimizer)
            else:
                train(args, ctx, model, optimizer)
        except mosaic.BackendNotSupported as exc:
            # The backend can't run these options or this model (a mesh of another size, heads % P): every
            # rank of the sp group raises the same, so this is a bad command line, not a crash.
            fail(str(exc))
    finally:
        mosaic.shutdown()


if __name__ == "__main__":
    main()
