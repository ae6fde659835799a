"""DDP, FSDP2 and distributed checkpoints with a Mosaic model (``mosaic.training``), on CPU/gloo.

The model attends over rows sharded on the sp group, and every rank's loss
is its share of its replica's loss (Mosaic's convention). A step's global
batch of ``TABLES`` tables is split over the dp replicas, so every layout
(dp x sp) and the one-process run train on the same data: each must give
the one-process gradients and weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

import mosaic
from mosaic.testing import max_error, run_distributed
from mosaic.training import (
    data_parallel_mesh,
    load_checkpoint,
    register_ddp_hook,
    save_checkpoint,
    set_fsdp_divide_factor,
)

# 10 rows over sp = 4 are uneven (3, 3, 2, 2); keys are the first 6 rows (a key prefix, as in TabPFN).
TABLES, ROWS, KV_LEN, FEATURES, EMBED, HEADS = 4, 10, 6, 3, 8, 2
STEPS, LR, TOL = 3, 1e-2, 1e-5
Record = dict[str, torch.Tensor]


class Block(nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.norm = nn.LayerNorm(EMBED)
        # No projection biases: the key bias's gradient is zero up to rounding (softmax ignores a shift of all
        # of a query's scores), and Adam's first step turns that noise into a full step of either sign.
        self.rows = mosaic.MultiAxisAttention(EMBED, HEADS, 1, backend, bias=False)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 2 * EMBED), nn.GELU(), nn.Linear(2 * EMBED, EMBED))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.rows(self.norm(h), kv_len=KV_LEN)
        return h + self.mlp(h)


class RowModel(nn.Module):
    """``(tables, local rows, features)`` to one value per row; attention over the sharded rows."""

    def __init__(self, backend: str = "local"):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, EMBED)
        self.blocks = nn.ModuleList(Block(backend) for _ in range(2))
        self.head = nn.Linear(EMBED, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).squeeze(-1)


def _model(backend: str = "local") -> RowModel:
    torch.manual_seed(0)
    return RowModel(backend)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``x (TABLES, ROWS, FEATURES)``, targets ``(TABLES, ROWS)``."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(TABLES, ROWS, FEATURES, generator=g), torch.randn(TABLES, ROWS, generator=g)


def _local(ctx: mosaic.Context, full: torch.Tensor) -> torch.Tensor:
    """This rank's part: its replica's tables, its sp rank's rows."""
    per = TABLES // ctx.dp_size
    return ctx.shard(full[ctx.dp_rank * per : (ctx.dp_rank + 1) * per], 1)


def _loss_share(pred: torch.Tensor, y: torch.Tensor, ctx: mosaic.Context) -> torch.Tensor:
    """This sp rank's share of its replica's mean squared error (the shares sum to it)."""
    return (pred.float() - y).square().sum() / ((TABLES // ctx.dp_size) * ROWS)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient, whole (FSDP2 holds DTensor shards) and as an fp32 copy."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def _grads(model: nn.Module) -> Record:
    return {n: _full(p.grad) for n, p in model.named_parameters()}


def _weights(model: nn.Module) -> Record:
    return {n: _full(p) for n, p in model.named_parameters()}


def _train(
    model: nn.Module,
    ctx: mosaic.Context | None,
    optimizer: torch.optim.Optimizer,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sync: Callable[[], None] = lambda: None,
    steps: Iterable[int] = range(STEPS),
) -> list[dict[str, Record]]:
    """Steps on this rank's data (the whole batch without ``ctx``); each step's gradients and new weights.

    ``forward`` is the wrapper to call (DDP reduces inside backward only when
    called through it); ``sync`` runs after backward.
    """
    forward = forward or model
    out = []
    for step in steps:
        x, y = _batch(step)
        optimizer.zero_grad()
        if ctx is None:
            (forward(x) - y).square().mean().backward()
        else:
            _loss_share(forward(_local(ctx, x)), _local(ctx, y), ctx).backward()
        sync()
        grads = _grads(model)
        optimizer.step()
        out.append({"grad": grads, "param": _weights(model)})
    return out


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def _fsdp2(model: nn.Module, ctx: mosaic.Context, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """torchtitan's recipe: each block, then the root, sharded over dp x sp flattened."""
    mesh = data_parallel_mesh(ctx)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    set_fsdp_divide_factor(model, ctx)
    return model


# --- tasks (every rank) ---------------------------------------------------------------------------


def ddp_task(sp: int) -> dict[str, list]:
    """DDP over dp x sp with Mosaic's hook, and the same steps through ``reduce_gradients``."""
    ctx = mosaic.init(sp_size=sp)
    ddp = DistributedDataParallel(_model("allgather"), device_mesh=data_parallel_mesh(ctx))
    register_ddp_hook(ddp, ctx)
    plain = _model("allgather")
    return {
        "ddp": _train(ddp.module, ctx, _adamw(ddp), forward=ddp),
        "reduce_gradients": _train(plain, ctx, _adamw(plain), sync=lambda: mosaic.reduce_gradients(plain, ctx)),
    }


def fsdp2_task(sp: int) -> list:
    ctx = mosaic.init(sp_size=sp)
    model = _fsdp2(_model("allgather"), ctx)
    return _train(model, ctx, _adamw(model))


def _fp32_sums_of_bf16_grads(ctx: mosaic.Context) -> Record:
    """What mixed precision must give: this rank's gradients computed in bf16, reduced by Mosaic in fp32."""
    low = _model("allgather").to(torch.bfloat16)
    x, y = (_local(ctx, t) for t in _batch(0))
    _loss_share(low(x.to(torch.bfloat16)), y, ctx).backward()
    wide = _model("allgather")
    for p, q in zip(wide.parameters(), low.parameters(), strict=True):
        p.grad = q.grad.float()
    mosaic.reduce_gradients(wide, ctx)
    return _grads(wide)


def fsdp2_bf16_task(sp: int) -> dict[str, Record]:
    """FSDP2 with bf16 parameters and fp32 reduction, one step, against the same sums by reduce_gradients."""
    ctx = mosaic.init(sp_size=sp)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _fsdp2(_model("allgather"), ctx, policy)
    x, y = (_local(ctx, t) for t in _batch(0))
    _loss_share(model(x), y, ctx).backward()
    return {"got": _grads(model), "want": _fp32_sums_of_bf16_grads(ctx)}


def ddp_bf16_task(sp: int) -> dict[str, Record]:
    """DDP of a bf16 model: the hook sums in fp32 as reduce_gradients does (DDP's own hook sums in bf16)."""
    ctx = mosaic.init(sp_size=sp)
    ddp = DistributedDataParallel(_model("allgather").to(torch.bfloat16), device_mesh=data_parallel_mesh(ctx))
    register_ddp_hook(ddp, ctx)
    plain = _model("allgather").to(torch.bfloat16)
    x, y = (_local(ctx, t) for t in _batch(0))
    _loss_share(ddp(x.to(torch.bfloat16)), y, ctx).backward()
    _loss_share(plain(x.to(torch.bfloat16)), y, ctx).backward()
    mosaic.reduce_gradients(plain, ctx)
    return {"got": _grads(ddp.module), "want": _grads(plain)}


def wrong_group_task() -> list[str]:
    """DDP or FSDP2 over the dp group only would never sum the sp shares: the helpers refuse them."""
    ctx = mosaic.init(sp_size=2)
    ddp = DistributedDataParallel(_model("allgather"), process_group=ctx.dp_group)
    with pytest.raises(ValueError, match="DDP reduces over 2 ranks") as ddp_error:
        register_ddp_hook(ddp, ctx)
    model = fully_shard(_model("allgather"), mesh=DeviceMesh.from_group(ctx.dp_group, "cpu"))
    with pytest.raises(ValueError, match="sharded over 2 ranks") as fsdp_error:
        set_fsdp_divide_factor(model, ctx)
    return [str(ddp_error.value), str(fsdp_error.value)]


@dataclass
class Trainer:
    """A model trained one of three ways: ``wrapped`` is what is called and checkpointed."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    sync: Callable[[], None]

    @classmethod
    def make(cls, ctx: mosaic.Context, kind: str) -> Trainer:
        model = _model("allgather" if ctx.sp_size > 1 else "local")
        if kind == "fsdp2":
            return cls(_fsdp2(model, ctx), model, _adamw(model), lambda: None)
        if kind == "ddp":
            ddp = DistributedDataParallel(model, device_mesh=data_parallel_mesh(ctx))
            register_ddp_hook(ddp, ctx)
            return cls(model, ddp, _adamw(model), lambda: None)
        return cls(model, model, _adamw(model), lambda: mosaic.reduce_gradients(model, ctx))

    def train(self, ctx: mosaic.Context, steps: Iterable[int]) -> list[dict[str, Record]]:
        return _train(self.model, ctx, self.optimizer, forward=self.wrapped, sync=self.sync, steps=steps)


@torch.no_grad()
def _predict(model: nn.Module, ctx: mosaic.Context) -> torch.Tensor:
    """Predictions for every row of a fixed batch, gathered over the sp group."""
    x = torch.randn(TABLES, ROWS, FEATURES, generator=torch.Generator().manual_seed(7))
    return ctx.unshard(model(ctx.shard(x, 1)), 1)


def save_task(sp: int, directory: str, kind: str) -> dict:
    """Two steps, a checkpoint, then the third step (what a resumed run must reproduce)."""
    ctx = mosaic.init(sp_size=sp)
    trainer = Trainer.make(ctx, kind)
    trainer.train(ctx, range(2))
    save_checkpoint(directory, trainer.wrapped, trainer.optimizer, extra={"step": 2, "layout": [ctx.dp_size, sp]})
    saved = {"weights": _weights(trainer.model), "pred": _predict(trainer.model, ctx)}
    saved["step3"] = trainer.train(ctx, range(2, 3))[-1]["param"]
    return saved


def resume_task(sp: int, directory: str, kind: str) -> dict:
    ctx = mosaic.init(sp_size=sp)
    trainer = Trainer.make(ctx, kind)
    extra = load_checkpoint(directory, trainer.wrapped, trainer.optimizer)
    out = {"extra": extra, "weights": _weights(trainer.model), "pred": _predict(trainer.model, ctx)}
    out["step3"] = trainer.train(ctx, range(extra["step"], 3))[-1]["param"]
    return out


# --- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Record]]:
    """Every step on the whole batch in one process (local attention)."""
    model = _model()
    return _train(model, None, _adamw(model))


def _assert_close(got: Record, want: Record, what: str, tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = max_error(got[name], want[name])
        assert err <= tol, f"{what}, {name}: error {err:.2e} > {tol:.0e}"


def _assert_steps(results: list, reference: list, label: str) -> None:
    for rank, steps in enumerate(results):
        for step, (got, want) in enumerate(zip(steps, reference, strict=True)):
            _assert_close(got["grad"], want["grad"], f"{label} rank {rank} step {step} gradient")
            _assert_close(got["param"], want["param"], f"{label} rank {rank} step {step} weights")


def test_ddp_matches_single_process(reference) -> None:
    """dp = 2 x sp = 2: DDP with the hook == reduce_gradients == one process, gradients and 3 AdamW steps."""
    results = run_distributed(ddp_task, 4, 2, timeout=240)
    _assert_steps([r["ddp"] for r in results], reference, "DDP")
    _assert_steps([r["reduce_gradients"] for r in results], reference, "reduce_gradients")


def test_fsdp2_matches_single_process(reference) -> None:
    """dp = 2 x sp = 2, fully_shard over the 4 ranks flattened: gradients and 3 AdamW steps."""
    _assert_steps(run_distributed(fsdp2_task, 4, 2, timeout=240), reference, "FSDP2")


def test_reference_distinguishes_the_loss_scale(reference) -> None:
    """DDP's and FSDP2's own averaging (over dp x sp, not dp) would be caught: it is sp = 2 times off."""
    halved = {n: g / 2 for n, g in reference[0]["grad"].items()}
    assert max(max_error(halved[n], g) for n, g in reference[0]["grad"].items()) > 100 * TOL


def test_fsdp2_bf16_parameters_reduce_in_fp32() -> None:
    """param_dtype bf16, reduce_dtype fp32: the gradients are fp32 sums of the ranks' bf16 gradients."""
    for rank, result in enumerate(run_distributed(fsdp2_bf16_task, 4, 2, timeout=240)):
        _assert_close(result["got"], result["want"], f"rank {rank}")
        # A reduction in bf16 rounds to bf16 at least once: far more than the tolerance.
        assert max(max_error(w.bfloat16().float(), w) for w in result["want"].values()) > 100 * TOL


def test_ddp_of_bf16_model_sums_in_fp32() -> None:
    """bf16 parameters under DDP: the hook widens each bucket, sums, scales and rounds once, as reduce_gradients."""
    for rank, result in enumerate(run_distributed(ddp_bf16_task, 4, 2, timeout=240)):
        _assert_close(result["got"], result["want"], f"rank {rank}")


def test_helpers_need_every_rank() -> None:
    for message in run_distributed(wrong_group_task, 4, timeout=120)[0]:
        assert "dp x sp = 2 x 2" in message and "data_parallel_mesh" in message


def test_helpers_refuse_a_world_without_them() -> None:
    ctx = mosaic.init()
    try:
        with pytest.raises(ValueError, match="launch with torchrun"):
            data_parallel_mesh(ctx)
        with pytest.raises(ValueError, match="no module of the model is fully_shard-ed"):
            set_fsdp_divide_factor(_model(), ctx)
    finally:
        mosaic.shutdown()


def _assert_resumed(saved: dict, resumed: dict, label: str) -> None:
    assert resumed["extra"] == {"step": 2, "layout": [2, 2]}, label
    for name, w in saved["weights"].items():
        assert torch.equal(resumed["weights"][name], w), f"{label}: {name} did not load bit for bit"
    torch.testing.assert_close(resumed["pred"], saved["pred"], atol=1e-6, rtol=1e-6, msg=lambda m: f"{label}: {m}")
    # The optimizer state came along: the next step is the step the saving run took.
    _assert_close(resumed["step3"], saved["step3"], f"{label}, step after resuming")


def _resume_in_this_process(directory: Path) -> dict:
    """``python train.py --resume``: one process, no process group."""
    try:
        return resume_task(1, str(directory), "plain")
    finally:
        mosaic.shutdown()


@pytest.mark.parametrize("kind", ["plain", "ddp"])
def test_checkpoint_of_replicated_model_resumes_at_other_layouts(tmp_path: Path, kind: str) -> None:
    """Saved at dp = 2 x sp = 2 (reduce_gradients, or DDP), loaded by a plain model at sp = 4 and in one process."""
    directory = str(tmp_path / "ckpt")
    saved = run_distributed(save_task, 4, 2, directory, kind, timeout=240)[0]
    assert (tmp_path / "ckpt" / ".metadata").is_file() and not (tmp_path / "ckpt.tmp").exists()
    _assert_resumed(saved, run_distributed(resume_task, 4, 4, directory, "plain", timeout=240)[0], "sp=4")
    _assert_resumed(saved, _resume_in_this_process(tmp_path / "ckpt"), "one process")


def test_checkpoint_of_fsdp2_model_reshards(tmp_path: Path) -> None:
    """FSDP2 over 4 ranks (dp = 2 x sp = 2) saved; loaded by FSDP2 over 2 and 4 ranks and by a plain model."""
    directory = str(tmp_path / "ckpt")
    saved = run_distributed(save_task, 4, 2, directory, "fsdp2", timeout=240)[0]
    _assert_resumed(saved, run_distributed(resume_task, 2, 2, directory, "fsdp2", timeout=240)[0], "FSDP2 sp=2 dp=1")
    _assert_resumed(saved, run_distributed(resume_task, 4, 4, directory, "fsdp2", timeout=240)[0], "FSDP2 sp=4")
    _assert_resumed(saved, _resume_in_this_process(tmp_path / "ckpt"), "one process")


def test_load_checkpoint_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "old.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"a torch\.save checkpoint"):
        load_checkpoint(tmp_path / "old.pt", _model())
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "missing", _model())


def test_a_checkpoint_of_another_model_fails_as_an_exception(tmp_path: Path) -> None:
    """torch's CheckpointException is a BaseException; Mosaic's functions raise a CheckpointError instead."""
    save_checkpoint(tmp_path / "ckpt", nn.Linear(4, 4))
    other = nn.Sequential(nn.Linear(4, 4))  # its keys are "0.weight", "0.bias"
    try:
        load_checkpoint(tmp_path / "ckpt", other)
    except Exception as exc:  # what a training loop catches
        assert isinstance(exc, mosaic.CheckpointError), type(exc)
        assert "loading the distributed checkpoint" in str(exc) and "0.weight" in str(exc)
    else:
        pytest.fail("loading another model's checkpoint raised nothing")
