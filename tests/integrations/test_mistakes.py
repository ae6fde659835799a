"""The silent mistakes of issue 14, each now an error on every rank (or now correct), on 2 gloo processes.

(a) a sharded dim left on ``backend="local"``; (b) a distributed backend over
a dim that is whole on every rank; (c) ``nn.MultiheadAttention``'s
``attn(x, x)[0] + x`` on ``mosaic.MultiAxisAttention``; (d) ``kv_len`` as a
numpy integer or a 0-d integer tensor; (e) ``ctx.unshard``'s gradient; (f)
``set_backend(name, **options)`` reaching the backend.

A task that expects an error catches it and returns its type and message:
both ranks must report the same one (a rank that raised alone would leave
the other waiting in a collective). Nothing here needs tabpfn or tabicl.
"""

from __future__ import annotations

import pytest
import torch
from integration_utils import assert_close

import mosaic
from mosaic.testing import mha_reference, run_distributed

WORLD = 2
BATCH, ROWS, EMBED, HEADS = 2, 7, 8, 2  # 7 rows: uneven shards (4 + 3)


def make_rows() -> torch.Tensor:
    return torch.randn(BATCH, ROWS, EMBED, generator=torch.Generator().manual_seed(8))


def make_attention(backend: str = "local", **options) -> mosaic.MultiAxisAttention:
    torch.manual_seed(9)
    return mosaic.MultiAxisAttention(EMBED, HEADS, attention_axis=1, backend=backend, backend_options=options)


def error_of(call) -> tuple[str, str]:
    """The type and message of what ``call()`` raised (``"no error"`` when it returned)."""
    try:
        call()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


def assert_same_error(results: list[tuple[str, str]], kind: str, *words: str) -> str:
    assert results[0] == results[1], f"the ranks disagree: {results}"
    name, message = results[0]
    assert name == kind, results[0]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def local_on_sharded_dim() -> tuple[str, str]:
    ctx = mosaic.init(sp_size=WORLD)
    x = ctx.shard(make_rows(), dim=1)
    return error_of(lambda: make_attention("local")(x))


def test_a_local_backend_on_a_sharded_dim_raises_on_every_rank() -> None:
    assert_same_error(run_distributed(local_on_sharded_dim, WORLD), "ValueError", "sharded", "backend 'local'")


def distributed_on_whole_dim() -> tuple[str, str]:
    mosaic.init(sp_size=WORLD)
    # Every rank holds the whole tensor and nothing declares dim 1 sharded.
    return error_of(lambda: make_attention("allgather")(make_rows()))


def test_b_distributed_backend_on_a_whole_dim_raises_on_every_rank() -> None:
    assert_same_error(run_distributed(distributed_on_whole_dim, WORLD), "ValueError", "not a dim declared sharded")


def multihead_attention_habit(backend: str) -> tuple[str, str]:
    ctx = mosaic.init(sp_size=WORLD)
    x = ctx.shard(make_rows(), dim=1) if backend != "local" else make_rows()
    attn = make_attention(backend)
    return error_of(lambda: attn(x, x)[0] + x)


@pytest.mark.parametrize("backend", ["allgather", "local"])
def test_c_multihead_attention_call_habit_raises_on_every_rank(backend: str) -> None:
    """``attn(x, x)[0]`` would be batch element 0 of the output: it raises instead, sharded or not."""
    message = assert_same_error(run_distributed(multihead_attention_habit, WORLD, backend), "ValueError")
    assert "attn(x, x)" in message and "mosaic.MultiheadAttention" in message


def kv_len_values(kind: str) -> dict[str, object]:
    if kind == "numpy":
        import numpy as np

        return {"numpy int64": np.int64(5), "numpy int32": np.int32(5), "numpy 0-d array": np.array(5)}
    return {"int64 tensor": torch.tensor(5), "int32 tensor": torch.tensor(5, dtype=torch.int32)}


def kv_len_types(kind: str) -> dict[str, torch.Tensor | tuple[str, str]]:
    ctx = mosaic.init(sp_size=WORLD)
    full = make_rows()
    attn = make_attention("allgather")
    x = ctx.shard(full, dim=1)
    out: dict = {}
    for name, value in kv_len_values(kind).items():
        out[f"module, {name}"] = attn(x, kv_len=value).detach()
        projected = mosaic.attention(*attn.project(x), backend="allgather", kv_len=value)
        out[f"mosaic.attention, {name}"] = attn.output(projected, x).detach()
    out["reference"] = ctx.shard(mha_reference(attn, full, kv_len=5), dim=1, declare=False).detach()
    out["float tensor"] = error_of(lambda: attn(x, kv_len=torch.tensor(5.0)))
    return out


@pytest.mark.parametrize("kind", ["0-d tensor", "numpy"])
def test_d_kv_len_as_numpy_integer_or_0d_tensor_works(kind: str) -> None:
    if kind == "numpy":
        pytest.importorskip("numpy", reason="numpy is not a dependency of Mosaic; the integrations session has it")
    results = run_distributed(kv_len_types, WORLD, kind)
    assert_same_error([r.pop("float tensor") for r in results], "TypeError", "kv_len must be an int")
    for rank, got in enumerate(results):
        want = got.pop("reference")
        assert len(got) == 2 * len(kv_len_values(kind))
        for name, out in got.items():
            assert_close(out, want, f"rank {rank} kv_len as {name}")


def unshard_function(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gather) -> torch.Tensor:
    """A row-wise step before the gather (``scale``), then a step that mixes rows after it (``shift``)."""
    full = gather(torch.tanh(x * scale))
    return torch.softmax(full, dim=1) * shift


def unshard_grads() -> dict[str, torch.Tensor]:
    ctx = mosaic.init(sp_size=WORLD)
    g = torch.Generator().manual_seed(10)
    x_full = torch.randn(BATCH, ROWS, EMBED, generator=g)
    weight = torch.randn(BATCH, ROWS, EMBED, generator=g)
    params = torch.nn.ParameterDict(
        {n: torch.nn.Parameter(torch.randn(EMBED, generator=g)) for n in ("scale", "shift")}
    )
    x = ctx.shard(x_full, dim=1).requires_grad_()
    out = unshard_function(x, params["scale"], params["shift"], lambda t: ctx.unshard(t, 1))
    # Each rank's loss is its share of the total: here, the terms of the rows it holds.
    rows = ctx.sharded_dim(ROWS)
    rows.take(out * weight, 1).sum().backward()
    mosaic.reduce_gradients(params)
    # The unsharded computation, the same on every rank.
    xr, sr, hr = (t.detach().clone().requires_grad_() for t in (x_full, params["scale"], params["shift"]))
    (unshard_function(xr, sr, hr, lambda t: t) * weight).sum().backward()
    return {
        "x": x.grad, "x want": rows.take(xr.grad, 1), "scale": params["scale"].grad, "scale want": sr.grad,
        "shift": params["shift"].grad, "shift want": hr.grad,
    }  # fmt: skip


def test_e_unshard_is_differentiable() -> None:
    for rank, got in enumerate(run_distributed(unshard_grads, WORLD)):
        for name in ("x", "scale", "shift"):
            assert got[name] is not None, f"rank {rank}: no gradient for {name}"
            assert_close(got[name], got[f"{name} want"], f"rank {rank} grad of {name}")


SET_BACKEND = (
    ("mesh2d", {"mesh_shape": (1, WORLD)}),
    ("mesh2d", {"mesh_shape": (WORLD, 1)}),
    ("allgather", {"chunks": 2}),
)


def set_backend_options() -> dict:
    ctx = mosaic.init(sp_size=WORLD)
    full = make_rows()
    x = ctx.shard(full, dim=1)
    attn = make_attention("local")
    out: dict = {"want": ctx.shard(mha_reference(attn, full, kv_len=6), dim=1, declare=False).detach(), "runs": []}
    for name, options in SET_BACKEND:
        attn.set_backend(name, **options)
        out["runs"].append((attn.backend_name, attn.backend_options, attn(x, kv_len=6).detach()))
    # A mesh of the wrong size is refused by set_backend itself: its groups could not be made.
    out["bad mesh"] = error_of(lambda: attn.set_backend("mesh2d", mesh_shape=(WORLD, WORLD)))
    out["unknown option"] = error_of(lambda: attn.set_backend("allgather", chunk=2))
    return out


def test_f_set_backend_options_reach_the_backend() -> None:
    """The options are the module's and its backend's: mesh2d runs (it needs mesh_shape), a bad value raises."""
    results = run_distributed(set_backend_options, WORLD)
    assert_same_error([r["bad mesh"] for r in results], "BackendNotSupported", f"mesh_shape {(WORLD, WORLD)}")
    assert_same_error([r["unknown option"] for r in results], "ValueError", "'chunk'", "chunks")
    for rank, got in enumerate(results):
        for (name, options), (backend, backend_options, out) in zip(SET_BACKEND, got["runs"], strict=True):
            what = f"rank {rank} {name} {options}"
            assert backend == name, f"{what}: the module runs {backend!r}"
            assert {k: backend_options[k] for k in options} == options, f"{what}: options {backend_options}"
            assert_close(out, got["want"], what)


def test_f_options_are_checked_without_a_process_group() -> None:
    """An option meant for another backend raises at once, naming the valid ones (no process needed)."""
    attn = make_attention("local")
    with pytest.raises(ValueError, match="its options: chunks"):
        attn.set_backend("allgather", mesh_shape=(1, 2))
