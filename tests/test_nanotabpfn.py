"""nanoTabPFN (examples/nanotabpfn) against the original model, sharded and not.

The reference is the public nanoTabPFN's structure with ``nn.MultiheadAttention``
(train rows attend to train rows, test rows to train rows, two calls). The
Mosaic model must load its ``state_dict`` and predict the same; with rows
sharded over 1, 2 and 4 gloo processes, one training step must give the same
loss and parameter gradients as the reference on the whole table.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mosaic
from mosaic.testing import run_distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanotabpfn"
TINY = dict(embedding_size=16, num_attention_heads=2, mlp_hidden_size=24, num_layers=2, num_outputs=3)
# 22 rows, 9 of them training rows. Over 2 ranks the split falls inside rank 0's
# rows [0, 11); over 4 inside rank 1's [6, 12), rank 0 holds only training rows
# and ranks 2 and 3 only test rows. Chunks of 8 rows cross the shard borders.
ROWS, TRAIN, FEATURES, TABLES, CHUNK = 22, 9, 3, 2, 8
TOL = 1e-5


def _example():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    import nanotabpfn

    return nanotabpfn


def _prior():
    ntp = _example()
    config = ntp.PriorConfig(ROWS, max_features=FEATURES, max_classes=3, batch_size=TABLES, chunk_rows=CHUNK)
    spec = ntp.prior.StepSpec(seed=ntp.prior.mix("test", 1), features=FEATURES, train_size=TRAIN)
    return config, spec


class ReferenceLayer(nn.Module):
    """The public nanoTabPFN block, with ``nn.MultiheadAttention``."""

    def __init__(self, e: int, heads: int, hidden: int):
        super().__init__()
        self.self_attention_between_datapoints = nn.MultiheadAttention(e, heads, batch_first=True)
        self.self_attention_between_features = nn.MultiheadAttention(e, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(e, hidden), nn.Linear(hidden, e)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(e), nn.LayerNorm(e), nn.LayerNorm(e)

    def forward(self, src: torch.Tensor, split: int) -> torch.Tensor:
        b, r, c, e = src.shape
        src = src.reshape(b * r, c, e)
        src = self.self_attention_between_features(src, src, src, need_weights=False)[0] + src
        src = self.norm1(src.reshape(b, r, c, e))
        src = src.transpose(1, 2).reshape(b * c, r, e)
        train = src[:, :split]
        left = self.self_attention_between_datapoints(train, train, train, need_weights=False)[0]
        right = self.self_attention_between_datapoints(src[:, split:], train, train, need_weights=False)[0]
        src = torch.cat([left, right], dim=1) + src
        src = self.norm2(src.reshape(b, c, r, e).transpose(2, 1))
        return self.norm3(self.linear2(F.gelu(self.linear1(src))) + src)


class ReferenceNanoTabPFN(nn.Module):
    """The public nanoTabPFN model: logits of the test rows from ``x (B, R, F)`` and ``y_train (B, N)``."""

    def __init__(self, embedding_size, num_attention_heads, mlp_hidden_size, num_layers, num_outputs):
        super().__init__()
        e = embedding_size
        self.feature_encoder = nn.Module()
        self.feature_encoder.linear_layer = nn.Linear(1, e)
        self.target_encoder = nn.Module()
        self.target_encoder.linear_layer = nn.Linear(1, e)
        self.transformer_blocks = nn.ModuleList(
            ReferenceLayer(e, num_attention_heads, mlp_hidden_size) for _ in range(num_layers)
        )
        self.decoder = nn.Module()
        self.decoder.linear1, self.decoder.linear2 = (
            nn.Linear(e, mlp_hidden_size),
            nn.Linear(mlp_hidden_size, num_outputs),
        )

    def forward(self, x: torch.Tensor, y_train: torch.Tensor, split: int) -> torch.Tensor:
        x = x.unsqueeze(-1)
        mean = torch.mean(x[:, :split], dim=1, keepdim=True)
        std = torch.std(x[:, :split], dim=1, keepdim=True) + 1e-20
        x = self.feature_encoder.linear_layer(torch.clip((x - mean) / std, min=-100, max=100))
        y = y_train.float().unsqueeze(-1)
        padding = torch.mean(y, dim=1, keepdim=True).repeat(1, x.shape[1] - split, 1)
        y = self.target_encoder.linear_layer(torch.cat([y, padding], dim=1).unsqueeze(-1))
        src = torch.cat([x, y], 2)
        for block in self.transformer_blocks:
            src = block(src, split)
        return self.decoder.linear2(F.gelu(self.decoder.linear1(src[:, split:, -1, :])))


def _reference_step(state: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The original model on the whole tables: loss = mean cross-entropy over test rows."""
    ntp = _example()
    config, spec = _prior()
    x, y = ntp.prior.draw_rows(config, spec, 0, ROWS)
    ref = ReferenceNanoTabPFN(**TINY)
    ref.load_state_dict(state)
    logits = ref(x, y[:, :TRAIN], TRAIN)
    loss = F.cross_entropy(logits.flatten(0, 1), y[:, TRAIN:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _example().NanoTabPFN(**TINY).state_dict()


def sharded_step(backend: str, checkpoint_layers: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Task on every rank: one step of training code on this rank's rows; loss and summed gradients."""
    ntp = _example()
    ctx = mosaic.init(sp_size=dist.get_world_size())
    config, spec = _prior()
    model = ntp.NanoTabPFN(**TINY, backend=backend, checkpoint_layers=checkpoint_layers)
    model.load_state_dict(_initial_state())
    tables = ntp.sample(config, spec, ctx.sharded_dim(ROWS, dim=1), ctx.device)
    loss = ntp.compute_gradients(model, tables, ctx)
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference() -> tuple[float, dict[str, torch.Tensor]]:
    return _reference_step(_initial_state())


@pytest.mark.parametrize(
    ("world", "backend", "checkpoint_layers"),
    [(1, "ring", False), (2, "ring", False), (4, "ring", False), (4, "allgather", False), (2, "allgather", True)],
)
def test_sharded_step_matches_unsharded(reference, world: int, backend: str, checkpoint_layers: bool) -> None:
    want_loss, want_grads = reference
    results = run_distributed(sharded_step, world, backend, checkpoint_layers, timeout=240)
    for rank, (loss, grads) in enumerate(results):
        assert loss == pytest.approx(want_loss, abs=TOL), f"rank {rank}"
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


def chunked_inference(backend: str) -> float:
    """Task: predictions with the row-local parts in chunks of 3 rows (row attention by column) vs all at once."""
    ntp = _example()
    ctx = mosaic.init(sp_size=dist.get_world_size())
    config, spec = _prior()
    tables = ntp.sample(config, spec, ctx.sharded_dim(ROWS, dim=1), ctx.device)
    logits = []
    for rows in (None, 3):
        model = ntp.NanoTabPFN(**TINY, backend=backend, inference_rows=rows)
        model.load_state_dict(_initial_state())
        with torch.no_grad():
            logits.append(ctx.unshard(model(tables.x, tables.y, tables.train_size, tables.rows), 1))
    return float((logits[0] - logits[1]).abs().max())


@pytest.mark.parametrize(("world", "backend"), [(1, "local"), (2, "ring"), (3, "allgather")])
def test_chunked_inference_predicts_the_same(world: int, backend: str) -> None:
    assert all(err < 1e-5 for err in run_distributed(chunked_inference, world, backend))


def test_reference_is_sensitive_to_the_split(reference) -> None:
    """The comparison can fail: a step with train and test rows mixed up gives another loss."""
    ntp = _example()
    config, spec = _prior()
    model = ntp.NanoTabPFN(**TINY)
    model.load_state_dict(_initial_state())
    x, y = ntp.prior.draw_rows(config, spec, 0, ROWS)
    loss = ntp.local_loss(model(x, y, TRAIN + 1), ntp.Tables(x, y, TRAIN + 1, mosaic.ShardedDim.whole(ROWS)))
    assert abs(loss.item() - reference[0]) > 100 * TOL


def test_loads_multihead_attention_checkpoint() -> None:
    """A state_dict of the nn.MultiheadAttention model loads (strict) and predicts the same."""
    ntp = _example()
    config, spec = _prior()
    x, y = ntp.prior.draw_rows(config, spec, 0, ROWS)
    torch.manual_seed(1)
    ref = ReferenceNanoTabPFN(**TINY).eval()
    model = ntp.NanoTabPFN(**TINY).eval()
    model.load_state_dict(ref.state_dict())
    # Test rows' labels must not matter: scramble them.
    scrambled = y.clone()
    scrambled[:, TRAIN:] = (y[:, TRAIN:] + 1) % 3
    with torch.no_grad():
        want = ref(x, y[:, :TRAIN], TRAIN)
        got = model(x, scrambled, TRAIN)[:, TRAIN:]
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_prior_rows_do_not_depend_on_the_sharding() -> None:
    ntp = _example()
    config, spec = _prior()
    x, y = ntp.prior.draw_rows(config, spec, 0, ROWS)
    assert x.shape == (TABLES, ROWS, FEATURES) and y.shape == (TABLES, ROWS)
    assert int(y.max()) < 3 and x.isfinite().all()
    for cuts in ([0, 11, 22], [0, 6, 12, 17, 22], [0, 1, 9, 21, 22]):
        parts = [ntp.prior.draw_rows(config, spec, a, b) for a, b in itertools.pairwise(cuts)]
        assert torch.equal(torch.cat([p[0] for p in parts], 1), x)
        assert torch.equal(torch.cat([p[1] for p in parts], 1), y)
    other = ntp.prior.StepSpec(seed=spec.seed + 1, features=FEATURES, train_size=TRAIN)
    assert not torch.equal(ntp.prior.draw_rows(config, other, 0, ROWS)[0], x)


def _train_module():
    _example()
    spec = importlib.util.spec_from_file_location("nanotabpfn_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "world", "launched", "message"),
    [
        (["--sp-size", "3"], 4, True, "does not divide the world size 4"),
        (["--sp-size", "4", "--rows", "3"], 4, True, "--rows 3 is too few"),
        (["--sp-size", "2"], 1, False, "launch with torchrun"),
        (["--embedding-size", "10", "--heads", "4"], 1, False, "not divisible by --heads"),
        (["--backend", "nope"], 1, False, "'nope' is not installed"),
    ],
)
def test_cli_rejects_bad_input(argv: list[str], world: int, launched: bool, message: str) -> None:
    train = _train_module()
    args = train.parse_args(argv)
    args.sp_size = world if args.sp_size is None else args.sp_size
    assert message in train.check_args(args, world, launched)


TINY_ARGS = "--rows 20 --batch-size 2 --embedding-size 16 --heads 2 --layers 1 --mlp-hidden 16 --eval-batches 1"
TINY_RUN = [*TINY_ARGS.split(), "--iris-repeats", "1", "--device", "cpu", "--warmup", "1", "--steps", "4"]


def test_train_resume_continues_the_same_run(tmp_path: Path) -> None:
    """Two steps, then a resume to four, equals four steps straight (one process, CPU)."""
    train = _train_module()
    train.main([*TINY_RUN, "--out-dir", str(tmp_path / "straight")])
    train.main([*TINY_RUN, "--stop-after", "2", "--out-dir", str(tmp_path / "first")])
    checkpoint = tmp_path / "first" / "checkpoint"
    train.main([*TINY_RUN, "--out-dir", str(tmp_path / "resumed"), "--resume", str(checkpoint)])
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    assert resumed["evaluations"] == straight["evaluations"]
    for name in ("loss.png", "accuracy.png"):
        assert (tmp_path / "straight" / name).read_bytes().startswith(b"\x89PNG"), name


def train_main_task(argv: list[str]) -> None:
    """Task on every rank: train.py's main under a launcher's environment."""
    _train_module().main(argv)


def test_train_resumes_at_another_sp_size(tmp_path: Path) -> None:
    """Stopped with the rows over 2 processes (a distributed checkpoint), resumed in one: the same run."""
    train = _train_module()
    train.main([*TINY_RUN, "--out-dir", str(tmp_path / "straight")])
    first = [*TINY_RUN, "--sp-size", "2", "--stop-after", "2", "--out-dir", str(tmp_path / "first")]
    run_distributed(train_main_task, 2, first, timeout=240)
    resume = ["--resume", str(tmp_path / "first" / "checkpoint")]
    train.main([*TINY_RUN, "--out-dir", str(tmp_path / "resumed"), *resume])
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    # Sharding changes only the rounding: the losses agree to fp32 precision, not bit for bit.
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-5)
    assert resumed["sp_size"] == 1 and len(resumed["losses"]) == 4


def test_same_seed_gives_the_same_run_bit_for_bit(tmp_path: Path) -> None:
    """Rows over 2 processes, twice: the same losses and accuracies, exactly (what the demo's figures rest on)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        run_distributed(train_main_task, 2, [*TINY_RUN, "--sp-size", "2", "--out-dir", str(out)], timeout=240)
    a, b = (json.loads((out / "metrics.json").read_text()) for out in runs)
    assert a["losses"] == b["losses"] and a["evaluations"] == b["evaluations"]


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    train = _train_module()
    train.main([*TINY_RUN, "--stop-after", "1", "--out-dir", str(tmp_path / "first")])
    resume = ["--resume", str(tmp_path / "first" / "checkpoint"), "--out-dir", str(tmp_path / "other")]
    with pytest.raises(ValueError, match="is of another model"):
        train.main([*TINY_RUN, "--layers", "2", *resume])


def test_iris_comes_from_scikit_learn_or_is_skipped(monkeypatch) -> None:
    realdata = _example().realdata
    x, y, names = realdata.load_iris()
    assert x.shape == (150, 4) and y.shape == (150,) and names == ["setosa", "versicolor", "virginica"]
    assert torch.bincount(y).tolist() == [50, 50, 50]
    # An import of a module set to None raises ImportError, as when scikit-learn is not installed.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert realdata.load_iris() is None
