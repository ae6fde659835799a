"""``mosaic.MultiheadAttention``: ``nn.MultiheadAttention``'s constructor and call, on Mosaic.

Existing model code keeps its call sites — ``attn(query, key, value,
need_weights=False)[0]`` — and its checkpoints (the parameters have the same
names), and the sequence dim can be sharded by choosing a backend. What a
sharded call cannot do raises instead of running differently: attention
weights (an ``N x N`` matrix per head), arbitrary masks (``kv_len`` keeps a
key prefix), and ``nn.MultiheadAttention``'s extra key/value biases.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .attention import MultiAxisAttention, fold
from .functional import attend

__all__ = ["MultiheadAttention"]


class MultiheadAttention(MultiAxisAttention):
    """A drop-in ``nn.MultiheadAttention`` whose sequence dim may be sharded over the sp group.

    Args:
        embed_dim: as for ``nn.MultiheadAttention``.
        num_heads: as for ``nn.MultiheadAttention``.
        dropout: as for ``nn.MultiheadAttention`` (``local`` only).
        bias: as for ``nn.MultiheadAttention``.
        add_bias_kv: not supported (``False`` only).
        add_zero_attn: not supported (``False`` only).
        kdim: ``None`` or ``embed_dim`` only.
        vdim: ``None`` or ``embed_dim`` only.
        batch_first: as for ``nn.MultiheadAttention``.
        device: as for ``nn.MultiheadAttention``.
        dtype: as for ``nn.MultiheadAttention``.
        backend: Mosaic strategy over the sequence dim (``"local"``: whole on this rank).
        **kwargs: other keyword arguments of :class:`MultiAxisAttention` (``num_kv_heads``,
            ``layout``, ``backend_options``, ``sharded``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "local",
        **kwargs: Any,
    ):
        unsupported = [
            name
            for name, bad in (
                ("add_bias_kv=True", add_bias_kv),
                ("add_zero_attn=True", add_zero_attn),
                (f"kdim={kdim}", kdim not in (None, embed_dim)),
                (f"vdim={vdim}", vdim not in (None, embed_dim)),
            )
            if bad
        ]
        if unsupported:
            raise ValueError(f"mosaic.MultiheadAttention does not support {', '.join(unsupported)}")
        self.batch_first = batch_first
        super().__init__(
            embed_dim, num_heads, 1 if batch_first else 0, backend, dropout=dropout, bias=bias, device=device,
            dtype=dtype, **kwargs,
        )  # fmt: skip

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(attn_output, attn_weights)`` as ``nn.MultiheadAttention`` returns them.

        ``need_weights``, ``key_padding_mask`` and ``attn_mask`` run
        ``nn.MultiheadAttention``'s own arithmetic with ``backend="local"`` and raise
        with a distributed backend; ``is_causal`` masks by global position;
        ``kv_len`` (Mosaic's) keeps the first ``kv_len`` keys.
        """
        try:
            if key is None or value is None:
                raise TypeError(
                    f"{self.description} is called as nn.MultiheadAttention is: attn(query, key, value, "
                    "need_weights=False)[0] (query, key and value the same tensor for self-attention); for "
                    "attn(x) returning a tensor, use mosaic.MultiAxisAttention"
                )
            if query.dim() != 3:
                shape = tuple(query.shape)
                raise ValueError(f"query must be 3-D (batch, seq, embed or seq, batch, embed), got {shape}")
            extras = need_weights or key_padding_mask is not None or attn_mask is not None
            if extras and self.backend.capabilities.distributed:
                asked = [n for n, on in (("need_weights=True", need_weights), ("key_padding_mask", key_padding_mask
                         is not None), ("attn_mask", attn_mask is not None)) if on]  # fmt: skip
                raise ValueError(
                    f"{self.description}: {', '.join(asked)} is not available for sharded attention (weights are "
                    "N x N per head; masks must be a key prefix). Pass need_weights=False, and kv_len=... for a key "
                    "prefix or is_causal=True for a causal mask"
                )
        except (TypeError, ValueError) as exc:  # every rank of the sp group hears of it
            attend(None, None, None, self._call(None, is_causal, ()), error=exc)
            raise AssertionError("unreachable: attend raises the error it is given") from exc
        if extras:
            return self._torch_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, kv_len)  # fmt: skip
        kv = None if key is query and value is query else key
        value_source = None if value is key else value
        q, k, v = self.project(query, kv, value_source)
        dim = self.attention_axis
        out = self.attend(q, k, v, kv_len=kv_len, causal=is_causal, dim=dim,
                          batch_shape=tuple(fold(query, dim)[1]))  # fmt: skip
        return self.output(out, query), None

    def _torch_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal, kv_len):
        if self.grouped:
            raise ValueError("need_weights and masks need num_kv_heads=None (nn.MultiheadAttention's projections)")
        if kv_len is not None:
            keep = torch.arange(key.shape[self.attention_axis], device=key.device) < int(kv_len)
            pad = ~keep.expand(key.shape[1 - self.attention_axis], -1)
            key_padding_mask = pad if key_padding_mask is None else key_padding_mask | pad
        if is_causal and attn_mask is None:
            n, s = query.shape[self.attention_axis], key.shape[self.attention_axis]
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=query.device).triu(1)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None,
            False, self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average,
        )  # fmt: skip
        return (out.transpose(0, 1) if self.batch_first else out), weights
