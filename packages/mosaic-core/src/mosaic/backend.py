"""The backend contract: what a strategy declares, how it is priced, what it plans, what it runs.

A backend turns an :class:`~mosaic.problem.AttentionProblem` — facts every
rank of the sp group shares — into

- a :class:`~mosaic.cost.Cost` (:meth:`Backend.estimate`): what it would cost,
  forward and backward, on the busiest rank. Pricing is pure: no process
  group is made, no collective runs, and every rank gets the same answer
  (``auto`` and ``explain`` price every candidate);
- a frozen :class:`Plan` (:meth:`Backend.plan`) for the one that runs:
  everything the call needs that can be decided from those facts (blocks and
  their kernels, step sizes, busy tables, exchanges) and the groups it runs
  on, taken from the context's one set of groups (made when the layer was
  built). Mosaic caches plans by the facts that decide them, so a call with
  the same facts only executes: ``plan(q, k, v)`` runs collectives and kernels
  and nothing else.

A backend declares what it supports in :class:`Capabilities` and its typed
options in ``Options`` (a frozen :class:`~mosaic.options.Options` dataclass);
:meth:`Backend.not_supported_reasons` turns a mismatch into sentences and
:meth:`Backend.check` into one error listing all of them, as xformers'
operator dispatch does.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .blockwise import Piece, kernels_of
from .cost import Cost
from .errors import BackendNotSupported
from .layout import LAYOUTS
from .options import NoOptions, Options

if TYPE_CHECKING:
    from .context import Context
    from .problem import AttentionProblem

__all__ = ["FLOAT_DTYPES", "Backend", "BackendNotSupported", "Capabilities", "Plan"]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


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


@dataclass(frozen=True)
class Plan(ABC):
    """One backend's schedule for one problem; calling it runs the attention (differentiable).

    Subclasses are frozen dataclasses that add what their execution needs.
    ``cost`` describes the busiest rank of the group and is computed from facts
    every rank shares, so it is the same on every rank (``auto`` relies on it).
    """

    problem: AttentionProblem
    cost: Cost
    #: Whether torch.compile may trace the call into the graph: its collectives are ones dynamo traces
    #: (gathers, reduce-scatters, all-to-alls of :mod:`mosaic.comm`; no P2P, no host exchange). A plan
    #: that is not runs eagerly inside a compiled model: one graph break per call.
    traceable: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output for the local query rows, shaped like ``q``."""

    def block_pieces(self) -> list[Piece]:
        """Every block this plan computes (its own and its inner plans'), each with the kernel chosen for it."""
        found: list[Piece] = []
        _collect(self, found)
        return found

    def kernels(self) -> list[str]:
        """The block kernels this plan runs, each once, in order."""
        return kernels_of(self.block_pieces())


def _collect(value: Any, found: list[Piece]) -> None:
    if isinstance(value, Piece):
        found.append(value)
    elif isinstance(value, tuple | list):
        for item in value:
            _collect(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name not in ("problem", "cost"):
                _collect(getattr(value, f.name), found)


class Backend(ABC):
    """A strategy for attention over one (possibly sharded) dim."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    Options: ClassVar[type[Options]] = NoOptions

    def parse_options(self, values: Options | dict[str, Any] | None = None) -> Options:
        """Typed options from keyword values; a ``ValueError`` listing the valid fields otherwise."""
        return self.Options.parse(self.name, values)

    def prepare(self, context: Context, options: Options) -> None:
        """Create the process groups this backend will use with ``options``, now (collective over the world).

        Modules call it when they are built (and ``mosaic.prepare`` for modules built
        before ``mosaic.init``), so groups never appear in the middle of a step.
        The default creates none: the backend runs on the sp group itself.
        """
        return None

    def candidate_options(self, problem: AttentionProblem) -> list[Options]:
        """Option sets ``backend="auto"`` should try for ``problem`` (default: the defaults, if there are).

        Backends whose options have no defaults (a mesh shape) list the sensible
        values here, e.g. every factorisation of the group size.
        """
        try:
            return [self.parse_options({})]
        except ValueError:
            return []

    def environment_reasons(self) -> list[str]:
        """Why this backend can't run on this machine whatever the input (a package it calls is missing);
        empty when it can. ``available_backends`` and ``python -m mosaic`` ask it; override in a backend
        that wraps an engine installed apart from it (MagiAttention, ring-flash-attn)."""
        return []

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
            reasons.append("cross-attention (keys from another sequence) not supported")
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
        if not isinstance(p.options, self.Options):
            reasons.append(f"options are {type(p.options).__name__}, this backend takes {self.Options.__name__}")
            return reasons
        return reasons + self.extra_reasons(problem)

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        """Reasons beyond the declared capabilities (e.g. divisibility); override as needed."""
        return []

    def agreement_digest(self, options: Options) -> int:
        """What the ranks must agree on about this backend beyond its name: its options (override to add
        facts a rank decides from its own environment, as ``auto`` does with its machine model)."""
        return options.digest()

    def digest_differs(self, group: str) -> str:
        """What every rank says when the ranks' :meth:`agreement_digest` differ but their options are equal."""
        return (
            f"backend {self.name!r} decides from facts of each rank beyond its options, and they differ between "
            f"the ranks of the {group} group"
        )

    def estimate(self, problem: AttentionProblem) -> Cost:
        """The cost of running ``problem`` (which :meth:`check` accepted), without building anything.

        Pure: no process group is made and no collective runs, and every rank gets the same cost.
        The default prices the plan itself; a backend whose plan takes groups overrides it.
        """
        return self.plan(problem).cost

    def check(self, problem: AttentionProblem) -> None:
        reasons = self.not_supported_reasons(problem)
        if reasons:
            listed = "\n".join(f"  - {r}" for r in reasons)
            raise BackendNotSupported(f"backend {self.name!r} can't run this attention because:\n{listed}")

    @abstractmethod
    def plan(self, problem: AttentionProblem) -> Plan:
        """The schedule for ``problem`` (which :meth:`check` accepted); decided from shared facts only.

        Its groups come from ``problem.context.grid`` (made at :meth:`prepare`, else here, once).
        """
