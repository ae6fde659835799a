"""The backend contract: what a strategy declares and what it is handed.

A backend receives q, k, v in the canonical layout ``(batch, heads,
seq_local, head_dim)`` and an :class:`~mosaic.problem.AttentionProblem`, and
returns the attention output in the layout of q. It declares what it supports
in :class:`Capabilities`; :meth:`Backend.not_supported_reasons` turns a
mismatch into sentences, and :meth:`Backend.check` into one error listing all
of them (as xformers' operator dispatch does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .layout import LAYOUTS
from .problem import AttentionProblem

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendNotSupported(ValueError):
    """The chosen backend can't run this input; the message lists why."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. Defaults describe a fully general strategy."""

    distributed: bool = True
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES
    causal: bool = True
    kv_len: bool = True
    cross_attention: bool = True
    gqa: bool = True
    dropout: bool = False
    layouts: frozenset[str] = frozenset(LAYOUTS)
    min_group_size: int = 1
    max_group_size: int | None = None
    max_head_dim: int | None = None
    needs_mesh_shape: bool = False


class Backend(ABC):
    """A strategy for attention over one (possibly sharded) dim."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        """Human-readable reasons this backend can't run ``problem``; empty when it can."""
        caps, p = self.capabilities, problem
        reasons = []
        if p.device.type not in caps.devices:
            reasons.append(f"device {p.device.type} not supported (supported: {sorted(caps.devices)})")
        if p.dtype not in caps.dtypes:
            reasons.append(f"dtype {p.dtype} not supported (supported: {sorted(str(d) for d in caps.dtypes)})")
        if p.causal and not caps.causal:
            reasons.append("causal=True not supported")
        if p.kv_len is not None and not caps.kv_len:
            reasons.append("kv_len not supported")
        if p.cross and not caps.cross_attention:
            reasons.append("cross-attention (kv=...) not supported")
        if p.kv_heads != p.heads and not caps.gqa:
            reasons.append(f"grouped kv heads ({p.kv_heads} kv for {p.heads} query heads) not supported")
        if p.dropout > 0 and not caps.dropout:
            reasons.append(f"attention dropout ({p.dropout}) not supported; use dropout=0.0 or backend='local'")
        if p.q_layout.kind not in caps.layouts:
            reasons.append(f"layout {p.q_layout.kind!r} not supported (supported: {sorted(caps.layouts)})")
        if p.size < caps.min_group_size:
            reasons.append(f"needs at least {caps.min_group_size} ranks in the sp group, has {p.size}")
        if caps.max_group_size is not None and p.size > caps.max_group_size:
            reasons.append(f"runs on at most {caps.max_group_size} ranks, the sp group has {p.size}")
        if caps.max_head_dim is not None and p.head_dim > caps.max_head_dim:
            reasons.append(f"head dim {p.head_dim} > {caps.max_head_dim}")
        if caps.needs_mesh_shape and p.mesh_shape is None:
            reasons.append("needs mesh_shape=(...) on the module")
        return reasons + self.extra_reasons(problem)

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        """Reasons beyond the declared capabilities (e.g. divisibility); override as needed."""
        return []

    def check(self, problem: AttentionProblem) -> None:
        reasons = self.not_supported_reasons(problem)
        if reasons:
            listed = "\n".join(f"  - {r}" for r in reasons)
            raise BackendNotSupported(f"backend {self.name!r} can't run this attention because:\n{listed}")

    @abstractmethod
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        """Attention output for the local query rows, shaped like ``q``; differentiable."""
