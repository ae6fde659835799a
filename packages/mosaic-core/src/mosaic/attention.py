"""``MultiAxisAttention``: multi-head attention over any dim of an N-D tensor.

Routing moves the attention dim next to the embed dim and folds every other
dim into one batch dim (a view when the attention dim is already second to
last), projects to the canonical ``(batch, heads, seq, head_dim)`` layout,
hands that to the backend, and undoes the routing on the way out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .context import get_context
from .layout import LayoutKind, check_layout
from .problem import build_problem
from .registry import get_backend


def _fold(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """``(batch', seq, embed)`` with every dim but ``dim`` and embed folded into ``batch'``."""
    moved = x.movedim(dim, -2)
    # An explicit batch size: a rank may hold no rows of the attention dim (N < P).
    return moved.reshape(math.prod(moved.shape[:-2]), *moved.shape[-2:]), moved.shape[:-2]


def _unfold(y: torch.Tensor, batch_shape: torch.Size, dim: int) -> torch.Tensor:
    return y.reshape(*batch_shape, *y.shape[-2:]).movedim(-2, dim)


class MultiAxisAttention(nn.Module):
    """Multi-head attention over ``attention_axis`` of a ``(..., embed_dim)`` tensor.

    Args:
        embed_dim: size of the last dim.
        num_heads: query heads; must divide ``embed_dim``.
        attention_axis: the tensor dim to attend over (negative counts from the end;
            never the last, which is embed).
        backend: strategy name (``mosaic.available_backends()``); ``"local"`` needs no
            process group, the others shard ``attention_axis`` over the sp group.
        mesh_shape: rank grid for backends that need one (``mesh2d``, ``composed``, ...).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``);
            then q, k and v get separate projections.
        bias: biases in the projections.
        dropout: dropout on attention weights while training (``local`` only).
        layout: how the sharded axis is spread over ranks, ``"contiguous"`` or ``"zigzag"``
            (balanced causal ring); shard inputs with ``ctx.shard(x, dim, layout)``.
        backend_options: settings for the backend (e.g. a composition's inner strategy),
            handed to it as ``AttentionProblem.options``.

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
        self.mesh_shape = None if mesh_shape is None else tuple(mesh_shape)
        self.dropout = dropout
        self.layout = layout
        self.backend_options = dict(backend_options or {})
        self.set_backend(backend)
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

    @property
    def backend_name(self) -> str:
        return self._backend_name

    def set_backend(self, name: str) -> None:
        """Switch strategy (weights are shared by all); fails with an install hint if missing."""
        self.backend = get_backend(name)
        self._backend_name = name

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"attention_axis={self.attention_axis}, backend={self._backend_name!r}, mesh_shape={self.mesh_shape}"
        )

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

    def _attention_dim(self, x: torch.Tensor, name: str = "x") -> int:
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

    def _check_dtype(self, x: torch.Tensor, name: str = "x") -> None:
        weight = self.out_proj.weight
        # Under autocast, low-precision activations meet fp32 parameters by design.
        autocast = x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
        if x.device.type != weight.device.type or (x.dtype != weight.dtype and not autocast):
            raise TypeError(
                f"{name} is {x.dtype} on {x.device.type} but the module's parameters are {weight.dtype} on "
                f"{weight.device.type}; move one to the other (module.to(...) or x.to(...))"
            )

    def _project(self, xq: torch.Tensor, xkv: torch.Tensor | None):
        """q, k, v as ``(batch', heads, seq, head_dim)`` views of the projections."""
        b, length, _ = xq.shape
        if not self.grouped and xkv is None:
            qkv = F.linear(xq, self.in_proj_weight, self.in_proj_bias)
            return qkv.view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        w, bias = self.in_proj_weight_tensor(), self.in_proj_bias_tensor()
        source = xq if xkv is None else xkv
        e, kvw = self.embed_dim, self.num_kv_heads * self.head_dim
        q = F.linear(xq, w[:e], None if bias is None else bias[:e])
        kv = F.linear(source, w[e:], None if bias is None else bias[e:])
        k, v = kv.split([kvw, kvw], dim=-1)
        heads = lambda t, n: t.view(b, t.shape[1], n, self.head_dim).transpose(1, 2)
        return heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, *, kv_len: int | None = None, causal: bool = False
    ) -> torch.Tensor:
        """Attention over ``attention_axis``; returns a tensor shaped like ``x``.

        Args:
            x: queries (and keys/values unless ``kv`` is given), ``(..., embed_dim)``.
                With a distributed backend, this rank's shard along ``attention_axis``.
            kv: source of keys/values for cross-attention; same shape as ``x`` except
                along ``attention_axis``.
            kv_len: only the first ``kv_len`` positions (global index along the axis) are
                keys/values, e.g. TabPFN's training rows; in ``[1, N]``.
            causal: query ``i`` attends to keys ``j <= i`` (global positions).
        """
        dim = self._attention_dim(x)
        self._check_dtype(x)
        if kv is not None:
            self._attention_dim(kv, "kv")
            self._check_dtype(kv, "kv")
            if kv.dim() != x.dim() or any(
                a != b for i, (a, b) in enumerate(zip(x.shape, kv.shape, strict=False)) if i != dim
            ):
                raise ValueError(
                    f"kv shape {tuple(kv.shape)} must equal x shape {tuple(x.shape)} except along dim {dim}"
                )
        if kv_len is not None and (isinstance(kv_len, bool) or not isinstance(kv_len, int)):
            raise TypeError(f"kv_len must be an int, got {type(kv_len).__name__}")
        xq, batch_shape = _fold(x, dim)
        xkv = None if kv is None else _fold(kv, dim)[0]
        q, k, v = self._project(xq, xkv)
        distributed = self.backend.capabilities.distributed
        problem = build_problem(
            q,
            k,
            context=get_context() if distributed else None,
            layout=self.layout,
            kv_len=kv_len,
            causal=causal,
            scale=1.0 / math.sqrt(self.head_dim),
            dropout=self.dropout if self.training else 0.0,
            cross=kv is not None,
            mesh_shape=self.mesh_shape,
            options=self.backend_options,
        )
        self.backend.check(problem)
        out = self.backend.attention(q, k, v, problem)
        out = out.transpose(1, 2).reshape(xq.shape[0], xq.shape[1], self.embed_dim)
        return _unfold(self.out_proj(out), batch_shape, dim)
