"""The ``hierarchical`` backend: checks the hierarchy, then runs or delegates it.

Pairs of ``ring``/``allgather`` run as :mod:`mosaic_hier.hierarchical`. Three
cases are another backend exactly, and are handed to it:

- ``intra_node_strategy="ulysses"``: head parallel within the node, the inter
  strategy across nodes, i.e. mosaic-compose's ``composed`` backend with
  ``mesh_shape=(L, nodes)`` (head groups on contiguous ranks);
- one node (``L`` = sp size): the intra strategy over the sp group;
- one rank per node (``L = 1``): the inter strategy over the sp group.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from mosaic.sdk import (
    AttentionProblem,
    Backend,
    BackendNotSupported,
    BackendUnavailable,
    Capabilities,
    Context,
    Cost,
    Options,
    Pass,
    Plan,
    attention_passes,
    get_backend,
    lse_dtype,
    plan_inner,
)

from .hierarchical import HierPlan
from .options import HierOptions, warn_local_world
from .topology import topology

__all__ = ["HierarchicalBackend", "delegation"]


def delegation(problem: AttentionProblem, opts: HierOptions) -> tuple[str, dict, str] | None:
    """``(backend, its options, why)`` when another backend runs this hierarchy exactly; ``None`` to run it here."""
    local, nodes = opts.intra_node_size, opts.nodes(problem.size)
    if opts.intra_node_strategy == "ulysses":
        options = {"mesh_shape": (local, nodes), "head_parallel": True, "seq_parallel": opts.inter_node_strategy}
        why = f"intra_node_strategy='ulysses' x inter_node_strategy={opts.inter_node_strategy!r}"
        return "composed", options, why
    if nodes == 1:
        return opts.intra_node_strategy, {}, f"one node (intra_node_size={local} = sp size)"
    if local == 1:
        return opts.inter_node_strategy, {}, "one rank per node (intra_node_size=1)"
    return None


def _delegated(problem: AttentionProblem) -> tuple[Backend, AttentionProblem] | None:
    delegated = delegation(problem, problem.options)
    if delegated is None:
        return None
    name, options, _ = delegated
    backend = get_backend(name)
    return backend, dataclasses.replace(problem, options=backend.parse_options(options))


class HierarchicalBackend(Backend):
    """An intra-node strategy x an inter-node strategy (LoongTrain's double ring for ring/ring)."""

    name = "hierarchical"
    capabilities = Capabilities()
    Options = HierOptions

    def candidate_options(self, problem: AttentionProblem) -> list[Options]:
        """torchrun's node size when the sp group spans several nodes; nothing on one node."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", problem.size))
        if not 1 < local < problem.size or problem.size % local:
            return []
        return [HierOptions(local, a, b) for a in ("ring", "allgather") for b in ("ring", "allgather")]

    def prepare(self, context: Context, options: Options) -> None:
        local = options.intra_node_size
        if context.sp_size % local:
            raise BackendNotSupported(
                f"backend 'hierarchical': intra_node_size={local} does not divide the sp group size "
                f"{context.sp_size}; choose the ranks per node (a divisor of the sp size)"
            )
        if context.sp_size > 1:
            context.grid((context.sp_size // local, local), ("inter", "intra"))

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        opts = problem.options
        if problem.size % opts.intra_node_size:
            return [
                f"intra_node_size={opts.intra_node_size} does not divide the sp group size {problem.size}; "
                "choose the ranks per node (a divisor of the sp size)"
            ]
        delegated = delegation(problem, opts)
        if delegated is None:
            return []
        name, _, why = delegated
        what = f"{why} runs as backend {name!r}"
        try:
            backend, inner = _delegated(problem)
        except BackendUnavailable as exc:
            return [f"{what}, which is unavailable: {exc}"]
        except ValueError as exc:
            return [f"{what}, which can't take it: {exc}"]
        return [f"{what}, which can't run it: {r}" for r in backend.not_supported_reasons(inner)]

    def estimate(self, problem: AttentionProblem) -> Cost:
        delegated = _delegated(problem)
        if delegated is not None:
            backend, inner = delegated
            return backend.estimate(inner)
        return _cost(problem, problem.options)

    def plan(self, problem: AttentionProblem) -> Plan:
        opts = problem.options
        warn_local_world(opts.intra_node_size, os.environ.get("LOCAL_WORLD_SIZE"))
        delegated = _delegated(problem)
        if delegated is not None:
            backend, inner = delegated
            return plan_inner(backend, inner)
        topo = topology(problem, opts.intra_node_size)
        return HierPlan.of(problem, topo, opts, _cost(problem, opts))


def _cost(p: AttentionProblem, opts: HierOptions) -> Cost:
    """The busiest rank: a flat ring's bytes (the same total volume), hidden when both levels are rings."""
    e = torch.empty((), dtype=p.dtype).element_size()
    f = torch.empty((), dtype=lse_dtype(p.dtype)).element_size()
    kept = [p.kv_block(r).size for r in range(p.size)]
    width = p.batch * 2 * p.kv_heads * p.head_dim
    rings = (opts.inter_node_strategy == "ring") + (opts.intra_node_strategy == "ring")
    foreign = sum(kept) - min(kept)
    forward, backward = attention_passes(p.batch, p.heads, p.head_dim, p.busiest_pairs())
    return Cost(
        Pass(forward, width * foreign * e, rings / 2, p.size - 1),
        Pass(backward, width * foreign * (e + f), rings / 2, p.size - 1),
        memory=width * max(kept) * opts.intra_node_size * (e + f),
    )
