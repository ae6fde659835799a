"""``MultiAxisAttention``: multi-head attention over any dim of an N-D tensor.

Three steps, each public so that a model can work between them:

1. :meth:`MultiAxisAttention.project` moves the attention dim next to embed,
   folds every other dim into one batch dim (a view when the attention dim is
   already second to last) and projects to q, k, v in the canonical layout
   ``(batch', heads, seq_local, head_dim)`` — views of one packed projection;
2. :meth:`MultiAxisAttention.attend` runs :func:`mosaic.attention` with the
   module's backend, options and layout (a model may transform q and k first:
   RoPE, qk-norm, scalable softmax, other kv heads for some queries, a cache);
3. :meth:`MultiAxisAttention.output` applies the output projection and undoes
   the folding.

``forward`` is the three in a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .context import get_context, is_initialized
from .functional import Call, attend, prepare_layer
from .layout import LayoutKind, check_layout
from .problem import kv_len_int
from .registry import get_backend

__all__ = ["MultiAxisAttention"]


def fold(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """``(batch', seq, embed)`` with every dim but ``dim`` and embed folded into ``batch'``, and the batch shape."""
    moved = x.movedim(dim, -2)
    # An explicit batch size: a rank may hold no rows of the attention dim (N < P).
    return moved.reshape(math.prod(moved.shape[:-2]), *moved.shape[-2:]), moved.shape[:-2]


def unfold(y: torch.Tensor, batch_shape: torch.Size, dim: int) -> torch.Tensor:
    """Inverse of :func:`fold`: ``(batch', seq, embed)`` back to the batch shape, the attention dim at ``dim``."""
    return y.reshape(*batch_shape, *y.shape[-2:]).movedim(-2, dim)


def _product(shape: list[int]):
    """Every index tuple of ``shape`` (one empty tuple for no dims), in row-major order."""
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _product(shape[1:]):
            yield (i, *rest)


class MultiAxisAttention(nn.Module):
    """Multi-head attention over ``attention_axis`` of a ``(..., embed_dim)`` tensor.

    Args:
        embed_dim: size of the last dim.
        num_heads: query heads; must divide ``embed_dim``.
        attention_axis: the tensor dim to attend over (negative counts from the end;
            never the last, which is embed).
        backend: strategy name (``mosaic.available_backends()``, or ``"auto"``); ``"local"``
            needs no process group, the others shard ``attention_axis`` over the sp group.
        mesh_shape: rank grid for backends that take one (``mesh2d``, ``composed``): the
            backend option ``mesh_shape``.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``);
            then q, k and v get separate projections.
        bias: biases in the projections.
        dropout: dropout on attention weights while training (``local`` only).
        layout: how the sharded dim is spread over ranks, ``"contiguous"`` or ``"zigzag"``
            (balanced causal ring); shard inputs with ``ctx.shard(x, dim, layout)``.
        backend_options: the backend's options (``mosaic.get_backend(name).Options``),
            checked here: an unknown option raises, listing the valid ones.
        sharded: whether the attention dim is sharded over the sp group. ``None`` (default)
            checks the backend against what ``ctx.shard`` / ``ctx.sharded_dim`` declared
            (:mod:`mosaic.declarations`: by the dim's length, so reshapes between them change
            nothing): a distributed backend over a dim that is not declared sharded, or
            ``local`` over one that is, raises on every rank instead of computing the
            wrong thing. ``True``/``False`` says it for this module alone.
        inference_batch: without gradients (``torch.no_grad``, inference mode), project and
            attend at most this many entries of the folded batch' at a time, so the working
            memory is that of a chunk, not of q, k and v for the whole tensor. The chunks follow
            the folded dims (the same on every rank), so every rank runs the same calls.

    With ``num_kv_heads`` unset, the parameters are those of ``nn.MultiheadAttention``
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``), so its checkpoints load.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention_axis: int,
        backend: str = "local",
        mesh_shape: tuple[int, ...] | None = None,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        layout: LayoutKind = "contiguous",
        backend_options: Mapping[str, Any] | None = None,
        sharded: bool | None = None,
        inference_batch: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim ({embed_dim}) and num_heads ({num_heads}) must be positive")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kv_heads <= 0 or num_heads % kv_heads:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_layout(layout)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.attention_axis = attention_axis
        self.dropout = dropout
        self.layout = layout
        self.sharded = sharded
        if inference_batch is not None and (isinstance(inference_batch, bool) or inference_batch < 1):
            raise ValueError(f"inference_batch must be a positive int, got {inference_batch!r}")
        self.inference_batch = inference_batch
        options = dict(backend_options or {})
        if mesh_shape is not None:
            options["mesh_shape"] = tuple(mesh_shape)
        self.set_backend(backend, **options)
        factory = {"device": device, "dtype": dtype}
        self.grouped = num_kv_heads is not None
        if self.grouped:
            kv_width = kv_heads * self.head_dim
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(embed_dim, kv_width, bias=bias, **factory)
            self.v_proj = nn.Linear(embed_dim, kv_width, bias=bias, **factory)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation, so both start from the same distribution.
        if self.grouped:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.xavier_uniform_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        else:
            nn.init.xavier_uniform_(self.in_proj_weight)
            if self.in_proj_bias is not None:
                nn.init.zeros_(self.in_proj_bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    # -- the backend -------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def backend_options(self) -> dict[str, Any]:
        """The backend's options, every field (defaults included)."""
        return self.options.as_dict()

    @property
    def mesh_shape(self) -> tuple[int, ...] | None:
        return getattr(self.options, "mesh_shape", None)

    def set_backend(self, name: str, **options: Any) -> None:
        """Switch strategy (the weights are shared by all), with that backend's options, checked now.

        Fails with an install hint when the backend is missing, and with the list of
        valid options when one is unknown. When Mosaic is initialised the ranks compare
        the backend and its options, and the backend's process groups are created now,
        collectively: every rank builds the same modules, in the same order.
        """
        backend = get_backend(name)
        parsed = backend.parse_options(options)
        if self.sharded is False and backend.capabilities.distributed:
            raise ValueError(f"backend {name!r} shards the attention dim, but the module says sharded=False")
        self.backend, self.options = backend, parsed
        prepare_layer(backend, parsed, self.description)

    def extra_repr(self) -> str:
        options = f", {self.options}" if self.backend_options else ""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"attention_axis={self.attention_axis}, backend={self.backend_name!r}{options}"
        )

    @property
    def description(self) -> str:
        """How errors name this layer."""
        return f"{type(self).__name__}(attention_axis={self.attention_axis}, backend={self.backend_name!r})"

    # -- parameters ----------------------------------------------------------------------------

    def in_proj_weight_tensor(self, repeat_kv: bool = False) -> torch.Tensor:
        """The packed ``(q; k; v)`` projection weight; ``repeat_kv`` repeats grouped kv heads."""
        if not self.grouped:
            return self.in_proj_weight
        k, v = self.k_proj.weight, self.v_proj.weight
        if repeat_kv:
            k, v = (self._repeat_heads(t) for t in (k, v))
        return torch.cat([self.q_proj.weight, k, v])

    def in_proj_bias_tensor(self, repeat_kv: bool = False) -> torch.Tensor | None:
        if not self.grouped:
            return self.in_proj_bias
        if self.q_proj.bias is None:
            return None
        k, v = self.k_proj.bias, self.v_proj.bias
        if repeat_kv:
            k, v = (self._repeat_heads(t) for t in (k, v))
        return torch.cat([self.q_proj.bias, k, v])

    def _repeat_heads(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        return t.unflatten(0, (self.num_kv_heads, self.head_dim)).repeat_interleave(groups, 0).flatten(0, 1)

    # -- input checks --------------------------------------------------------------------------

    def attention_dim(self, x: torch.Tensor, name: str = "x") -> int:
        """``attention_axis`` as a non-negative dim of ``x``; a ``ValueError`` when ``x`` does not fit."""
        if x.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., seq, ..., embed), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"{name} has embed size {x.shape[-1]} (last dim), the module expects {self.embed_dim}")
        if not -x.dim() <= self.attention_axis < x.dim():
            raise ValueError(f"attention_axis {self.attention_axis} is out of range for a {x.dim()}-D {name}")
        dim = self.attention_axis % x.dim()
        if dim == x.dim() - 1:
            raise ValueError("attention_axis points at the last dim, which is embed; choose a token dim")
        return dim

    def check_dtype(self, x: torch.Tensor, name: str = "x") -> None:
        weight = self.out_proj.weight
        # Under autocast, low-precision activations meet fp32 parameters by design.
        autocast = x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
        if x.device.type != weight.device.type or (x.dtype != weight.dtype and not autocast):
            raise TypeError(
                f"{name} is {x.dtype} on {x.device.type} but the module's parameters are {weight.dtype} on "
                f"{weight.device.type}; move one to the other (module.to(...) or x.to(...))"
            )

    def _check_source(self, x: torch.Tensor, source: torch.Tensor, dim: int, name: str) -> None:
        self.attention_dim(source, name)
        self.check_dtype(source, name)
        if source.dim() != x.dim() or any(
            a != b for i, (a, b) in enumerate(zip(x.shape, source.shape, strict=False)) if i != dim
        ):
            raise ValueError(
                f"{name} shape {tuple(source.shape)} must equal x shape {tuple(x.shape)} except along dim {dim}"
            )

    def check_inputs(self, x: torch.Tensor, kv: torch.Tensor | None = None, value: torch.Tensor | None = None) -> int:
        """Check the inputs of a call (dims, embed size, dtype, shapes); the attention dim of ``x``."""
        dim = self.attention_dim(x)
        self.check_dtype(x)
        for name, source in (("kv", kv), ("value", value)):
            if source is not None:
                self._check_source(x, source, dim, name)
        return dim

    # -- the three steps -----------------------------------------------------------------------

    def project(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, value: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``(batch', heads, seq_local, head_dim)`` from ``x`` (and ``kv`` for keys/values).

        ``value`` (default: ``kv``, or ``x``) is a separate source for the values, as
        ``nn.MultiheadAttention`` allows. Checks the inputs; ``batch'`` folds every dim of
        ``x`` but the attention dim and embed, in order.
        """
        dim = self.check_inputs(x, kv, value)
        xq = fold(x, dim)[0]
        xk = None if kv is None else fold(kv, dim)[0]
        xv = None if value is None else fold(value, dim)[0]
        q, k, v = self._project(xq, xk, xv)
        if self._split(kv if kv is not None else x, dim):
            # Keys of this rank's rows of a sharded dim: mosaic.attention(..., backend="local") refuses them.
            k._mosaic_sharded = v._mosaic_sharded = True
        return q, k, v

    def _split(self, x: torch.Tensor, dim: int) -> bool:
        """Whether dim ``dim`` of ``x`` is this rank's part of a declared sharded dim (by its place and its length)."""
        if self.sharded is not None or not is_initialized() or get_context().sp_size == 1:
            return bool(self.sharded)
        declared = get_context().declarations.at(dim)
        if declared is None:
            return False
        if declared.layout is None:  # declared sharded without its length: the place alone says it
            return True
        return declared.layout.lengths[get_context().sp_rank] == x.shape[dim] < declared.total

    def _project(self, xq: torch.Tensor, xk: torch.Tensor | None, xv: torch.Tensor | None = None):
        b, length, _ = xq.shape
        if not self.grouped and xk is None and xv is None:
            qkv = F.linear(xq, self.in_proj_weight, self.in_proj_bias)
            return qkv.view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        w, bias = self.in_proj_weight_tensor(), self.in_proj_bias_tensor()
        e, kvw = self.embed_dim, self.num_kv_heads * self.head_dim
        part = lambda lo, hi: (w[lo:hi], None if bias is None else bias[lo:hi])
        keys = xq if xk is None else xk
        q = F.linear(xq, *part(0, e))
        if xv is None or xv is keys:
            k, v = F.linear(keys, *part(e, e + 2 * kvw)).split([kvw, kvw], dim=-1)
        else:
            k, v = F.linear(keys, *part(e, e + kvw)), F.linear(xv, *part(e + kvw, e + 2 * kvw))
        heads = lambda t, n: t.view(b, t.shape[1], n, self.head_dim).transpose(1, 2)
        return heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        kv_len: int | None = None,
        causal: bool = False,
        dim: int | None = None,
        batch_shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """:func:`mosaic.attention` with this module's backend, options, layout and dropout.

        Args:
            q: queries as :meth:`project` returns them (possibly transformed: RoPE, qk-norm, a scaled softmax).
            k: keys, likewise (or a K/V cache).
            v: values, likewise.
            kv_len: only the first ``kv_len`` positions (global index along the dim) are keys.
            causal: query ``i`` attends to keys ``j <= i`` (global positions).
            dim: the attention dim of the input (non-negative), for the sharding
                declaration check; default ``attention_axis`` when it is non-negative.
            batch_shape: the dims folded into batch' (for backends that redistribute them).
        """
        call = self._call(kv_len_int(kv_len), causal, batch_shape or (q.shape[0],))
        if dim is None and self.attention_axis >= 0:
            dim = self.attention_axis
        if dim is not None and not self.backend.capabilities.distributed and getattr(k, "_mosaic_sharded", False):
            return attend(None, None, None, call, error=self._local_over_sharded(dim))
        return attend(q, k, v, call)

    def output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output projection of ``out`` (``(batch', heads, seq, head_dim)``), shaped like ``x``."""
        dim = self.attention_axis % x.dim()
        b, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(b, length, self.embed_dim)
        return unfold(self.out_proj(out), fold(x, dim)[1], dim)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        *more: torch.Tensor,
        kv_len: int | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attention over ``attention_axis``; returns a tensor shaped like ``x``.

        Args:
            x: queries (and keys/values unless ``kv`` is given), ``(..., embed_dim)``.
                With a distributed backend, this rank's shard along ``attention_axis``.
            kv: source of keys/values for cross-attention; same shape as ``x`` except
                along ``attention_axis``.
            kv_len: only the first ``kv_len`` positions (global index along the dim) are
                keys/values, e.g. TabPFN's training rows; in ``[1, N]``; an int, a numpy
                integer or a 0-d integer tensor.
            causal: query ``i`` attends to keys ``j <= i`` (global positions).
        """
        try:
            if more or kv is x:
                raise (TypeError if more else ValueError)(
                    f"{self.description} was called as attn({', '.join(['x'] * (2 + len(more)))}): it takes the "
                    "input (and, for cross-attention, the source of keys and values) and returns a tensor, not "
                    "nn.MultiheadAttention's (output, weights), so attn(x, x)[0] would take batch element 0. Call "
                    "attn(x) for self-attention or attn(x, kv) for cross-attention, or use mosaic.MultiheadAttention "
                    "for nn.MultiheadAttention's call attn(query, key, value, need_weights=False)[0]"
                )
            kv_len = kv_len_int(kv_len)
            dim = self.attention_dim(x)
            batch_shape = tuple(fold(x, dim)[1])
            if not self.backend.capabilities.distributed and self._split(kv if kv is not None else x, dim):
                raise self._local_over_sharded(dim)
            chunked = self.inference_batch is not None and not torch.is_grad_enabled()
            if chunked and math.prod(batch_shape) > self.inference_batch:
                self.check_inputs(x, kv)
            else:
                chunked = False
                q, k, v = self._project_call(x, kv, dim, kv_len)
        except (TypeError, ValueError) as exc:
            # With a distributed backend every rank of the sp group must learn of it: they are about to agree.
            return attend(None, None, None, self._call(None, causal, ()), error=exc)
        if chunked:
            return self._chunked(x, kv, dim, kv_len, causal)
        out = attend(q, k, v, self._call(kv_len, causal, batch_shape))
        return self.output(out, x)

    def _local_over_sharded(self, dim: int) -> ValueError:
        return ValueError(
            f"{self.description} attends over dim {dim}, which is sharded over the sp group (ctx.shard(..., "
            f"dim={dim}) or ctx.sharded_dim(..., dim={dim})): backend 'local' would see only this rank's rows. "
            "Choose a distributed backend ('allgather', 'ring', 'auto', ...), or pass sharded=False to the module "
            "if this tensor's dim is whole on every rank"
        )

    def _project_call(self, x, kv, dim: int, kv_len: int | None):
        """:meth:`project` for a call; in self-attention over a whole dim with a key prefix, keys
        and values only for the ``kv_len`` rows that are keys (no K/V of the others is computed or kept)."""
        self.check_inputs(x, kv)
        xq = fold(x, dim)[0]
        if kv is None and kv_len is not None and 0 < kv_len < xq.shape[1] and not self.backend.capabilities.distributed:
            return self._project(xq, xq[:, :kv_len])
        return self._project(xq, None if kv is None else fold(kv, dim)[0])

    def _chunked(self, x, kv, dim: int, kv_len: int | None, causal: bool) -> torch.Tensor:
        """The forward in chunks of the last folded dim (the others looped): bounded working memory."""
        moved = x.movedim(dim, -2)
        source = None if kv is None else kv.movedim(dim, -2)
        *lead, last = moved.shape[:-2]
        step = max(1, self.inference_batch // max(1, math.prod(lead)))
        result = None
        for index in _product(lead):
            for start in range(0, last, step):
                part = (*index, slice(start, start + step))
                xq = moved[part]
                q, k, v = self._project(xq, None if source is None else source[part])
                out = attend(q, k, v, self._call(kv_len, causal, (xq.shape[0],)))
                b, _, length, _ = out.shape
                y = self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))
                if result is None:
                    result = y.new_empty((*moved.shape[:-1], self.embed_dim))
                result[part] = y
        return result.movedim(-2, dim)

    def _call(self, kv_len: int | None, causal: bool, batch_shape: tuple[int, ...]) -> Call:
        return Call(
            self.backend,
            self.options,
            kv_len,
            bool(causal),
            self.layout,
            None,
            self.dropout if self.training else 0.0,
            tuple(batch_shape),
            self.description,
            self.sharded,
        )
