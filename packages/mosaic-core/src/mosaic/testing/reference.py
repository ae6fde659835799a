"""References to check a strategy against: the same module on the unsharded tensor, and nn.MultiheadAttention.

:func:`compare_with_local` runs a backend on this rank's shard and ``local``
on the whole tensor with the same weights and returns the errors of the
output, the input gradients and the parameter gradients;
:func:`mha_reference` is an independent reference built on
``nn.MultiheadAttention``'s functional form; :func:`make_problem` builds an
:class:`~mosaic.problem.AttentionProblem` without a process group, to test a
backend's reasons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["compare_with_local", "local_reference", "make_problem", "max_error", "mha_reference", "reference_attention"]


@contextlib.contextmanager
def local_reference(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` switched to the ``local`` backend on unsharded inputs (same weights), restored after."""
    backend, options, sharded = module.backend_name, module.backend_options, module.sharded
    module.sharded = False
    module.set_backend("local")
    try:
        yield module
    finally:
        module.sharded = sharded
        module.set_backend(backend, **options)


def reference_attention(module: nn.Module, x: torch.Tensor, kv: torch.Tensor | None = None, **kwargs: Any):
    """``module`` run on the unsharded input with the ``local`` backend (same weights)."""
    with local_reference(module):
        return module(x, kv, **kwargs)


def mha_reference(
    module: nn.Module,
    x: torch.Tensor,
    kv: torch.Tensor | None = None,
    *,
    kv_len: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """An independent reference: ``nn.MultiheadAttention``'s functional form over the module's axis.

    It uses the module's own parameters, so gradients reach them too. Grouped kv
    heads are repeated into a full multi-head projection, so GQA is checked
    against plain multi-head attention.
    """
    dim = module.attention_axis % x.dim()
    source = x if kv is None else kv
    xq, xs = x.movedim(dim, -2), source.movedim(dim, -2)
    batch_shape = xq.shape[:-2]
    # (seq, batch', embed): the layout F.multi_head_attention_forward expects.
    xq = xq.reshape(-1, *xq.shape[-2:]).transpose(0, 1)
    xs = xs.reshape(-1, *xs.shape[-2:]).transpose(0, 1)
    visible = torch.ones(xq.shape[0], xs.shape[0], dtype=torch.bool, device=x.device)
    if kv_len is not None:
        visible[:, kv_len:] = False
    if causal:
        visible &= torch.ones_like(visible).tril()
    out, _ = F.multi_head_attention_forward(
        xq,
        xs,
        xs,
        module.embed_dim,
        module.num_heads,
        module.in_proj_weight_tensor(repeat_kv=True),
        module.in_proj_bias_tensor(repeat_kv=True),
        None,
        None,
        False,
        0.0,
        module.out_proj.weight,
        module.out_proj.bias,
        training=False,
        need_weights=False,
        attn_mask=~visible,
    )
    out = out.transpose(0, 1)
    return out.reshape(*batch_shape, *out.shape[-2:]).movedim(-2, dim)


def max_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude (at least 1)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    return diff / scale


def compare_with_local(
    backend: str,
    shape: tuple[int, ...],
    attention_axis: int,
    *,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    kv_length: int | None = None,
    kv_len: int | None = None,
    causal: bool = False,
    layout: str = "contiguous",
    mesh_shape: tuple[int, ...] | None = None,
    backend_options: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    autocast: bool = False,
    input_scale: float = 1.0,
    seed: int = 0,
    baseline_kernel: str | None = None,
) -> dict[str, float]:
    """Run ``backend`` on this rank's shard and ``local`` on the whole tensor; return the errors.

    Call on every rank after :func:`mosaic.init`. The full input, the output
    gradient and the weights come from ``seed`` (identical on all ranks); the
    input is sharded along ``attention_axis`` with ``layout``; ``mesh_shape`` and
    ``backend_options`` go to the module. ``kv_length`` makes
    it cross-attention from a source of that length. Errors (see
    :func:`max_error`) are for the output (``out``), the input and kv gradients
    (``dx``, ``dkv``) and the parameter gradients summed over the sp group
    (``params``). With ``reference_dtype`` the reference runs in that precision
    and the errors of ``local`` in ``dtype`` come back too (``local_*``): the
    single-device error to hold the sharded one against. With ``autocast`` the
    parameters and inputs stay fp32 and ``dtype`` is autocast's compute dtype
    (mixed-precision training); without it, everything is in ``dtype``. ``input_scale``
    multiplies the inputs (large logits test the merges' precision). ``baseline_kernel``
    runs that single-device ``local`` on the kernel of that name (e.g. ``"cudnn"``, to hold a
    strategy on another kernel against cuDNN's error).
    """
    import mosaic

    ctx = mosaic.get_context()
    device, dim = ctx.device, attention_axis % len(shape)
    torch.manual_seed(seed)
    make = dict(embed_dim=shape[-1], num_heads=num_heads, attention_axis=attention_axis, num_kv_heads=num_kv_heads)
    strategy = dict(mesh_shape=mesh_shape, layout=layout, backend_options=backend_options)
    state = mosaic.MultiAxisAttention(**make).state_dict()
    x_full = torch.randn(shape, device=device) * input_scale
    kv_full = None
    if kv_length is not None:
        kv_full = torch.randn((*shape[:dim], kv_length, *shape[dim + 1 :]), device=device) * input_scale
    grad_full = torch.randn(shape, device=device)

    def run(name: str, compute_dtype: torch.dtype, sharded: bool, kernel: str | None = None):
        mixed = autocast and compute_dtype != torch.float32
        run_dtype = torch.float32 if mixed else compute_dtype
        extra = strategy if sharded else {"sharded": False, "backend_options": {"kernel": kernel} if kernel else None}
        module = mosaic.MultiAxisAttention(backend=name, **make, **extra)
        module.load_state_dict(state)
        module.to(device=device, dtype=run_dtype)
        place = (lambda t: ctx.shard(t, dim, layout)) if sharded else (lambda t: t)
        # Fresh leaves every run: x_full itself must never collect gradients.
        x, grad = (place(t).to(run_dtype).detach().clone() for t in (x_full, grad_full))
        x.requires_grad_()
        kv = None if kv_full is None else place(kv_full).to(run_dtype).detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=compute_dtype, enabled=mixed):
            y = module(x, kv, kv_len=kv_len, causal=causal)
        y.backward(grad.to(y.dtype))
        gather = (lambda t: ctx.unshard(t, dim, layout)) if sharded else (lambda t: t)
        if sharded:
            mosaic.reduce_gradients(module, ctx, average_dp=False)
        got: dict[str, torch.Tensor | None] = {"out": gather(y.detach()), "dx": gather(x.grad)}
        got["dkv"] = None if kv is None else gather(kv.grad)
        got.update({f"param:{n}": p.grad for n, p in module.named_parameters()})
        return got

    def errors(got, want, prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}{key}": max_error(got[key], want[key]) for key in ("out", "dx", "dkv") if want[key] is not None
        }
        out[f"{prefix}params"] = max(max_error(got[k], want[k]) for k in want if k.startswith("param:"))
        return out

    got = run(backend, dtype, sharded=True)
    want = run("local", reference_dtype or dtype, sharded=False)
    result = errors(got, want)
    if reference_dtype is not None:
        result.update(errors(run("local", dtype, sharded=False, kernel=baseline_kernel), want, "local_"))
    return result


def make_problem(
    *,
    size: int = 1,
    heads: int = 4,
    kv_heads: int | None = None,
    length: int = 16,
    head_dim: int = 8,
    backend: str | None = None,
    options: Any = None,
    **fields: Any,
):
    """An :class:`~mosaic.problem.AttentionProblem` with no process group, to check a backend's reasons.

    ``size`` ranks share ``length`` positions (contiguous layout); ``options`` (a mapping
    or typed options) are parsed by ``backend``'s ``Options``; ``fields`` override any
    other field (``causal``, ``kv_len``, ``context``, ...). The default context describes
    a world of ``size`` ranks that has no groups.
    """
    import mosaic
    from mosaic.context import Context
    from mosaic.groups import Groups
    from mosaic.layout import SeqLayout
    from mosaic.problem import AttentionProblem

    layout = SeqLayout.even(length, size)
    values: dict[str, Any] = dict(
        batch=1, heads=heads, kv_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
        dtype=torch.float32, device=torch.device("cpu"), q_layout=layout, kv_layout=layout, rank=0,
        causal=False, kv_len=None, scale=head_dim**-0.5,
        context=Context(torch.device("cpu"), 0, size, Groups.without_groups(size), timedelta(seconds=1)),
    )  # fmt: skip
    if backend is not None:
        values["options"] = mosaic.get_backend(backend).parse_options(options)
    elif options is not None:
        values["options"] = options
    values.update(fields)
    return AttentionProblem(**values)
