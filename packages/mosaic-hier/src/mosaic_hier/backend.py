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
from types import MappingProxyType

import torch

from mosaic.backend import Backend, Capabilities
from mosaic.problem import AttentionProblem
from mosaic.registry import BackendUnavailable, get_backend

from .hierarchical import HierarchicalAttentionFunction
from .options import HierOptions, option_reasons, warn_local_world
from .topology import topology


def delegation(problem: AttentionProblem, opts: HierOptions) -> tuple[str, AttentionProblem, str] | None:
    """``(backend, problem, why)`` when another backend runs this hierarchy exactly; ``None`` to run it here."""
    local, nodes = opts.intra_node_size, opts.nodes(problem.size)
    if opts.intra_node_strategy == "ulysses":
        options = {"head_parallel": True, "seq_parallel": opts.inter_node_strategy}
        composed = dataclasses.replace(problem, mesh_shape=(local, nodes), options=MappingProxyType(options))
        why = f"intra_node_strategy='ulysses' x inter_node_strategy={opts.inter_node_strategy!r}"
        return "composed", composed, why
    flat = dataclasses.replace(problem, options=MappingProxyType({}))
    if nodes == 1:
        return opts.intra_node_strategy, flat, f"one node (intra_node_size={local} = sp size)"
    if local == 1:
        return opts.inter_node_strategy, flat, "one rank per node (intra_node_size=1)"
    return None


class HierarchicalBackend(Backend):
    """An intra-node strategy x an inter-node strategy (LoongTrain's double ring for ring/ring)."""

    name = "hierarchical"
    capabilities = Capabilities()

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = option_reasons(problem.options)
        if reasons:
            return reasons
        opts = HierOptions.from_mapping(problem.options)
        if problem.size % opts.intra_node_size:
            return [
                f"intra_node_size={opts.intra_node_size} does not divide the sp group size {problem.size}; "
                "choose the ranks per node (a divisor of the sp size)"
            ]
        delegated = delegation(problem, opts)
        if delegated is None:
            return []
        name, inner, why = delegated
        what = f"{why} runs as backend {name!r}"
        try:
            backend = get_backend(name)
        except BackendUnavailable as exc:
            return [f"{what}, which is unavailable: {exc}"]
        return [f"{what}, which can't run it: {r}" for r in backend.not_supported_reasons(inner)]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        opts = HierOptions.from_mapping(problem.options)
        warn_local_world(opts.intra_node_size, os.environ.get("LOCAL_WORLD_SIZE"))
        delegated = delegation(problem, opts)
        if delegated is not None:
            name, inner, _ = delegated
            return get_backend(name).attention(q, k, v, inner)
        return HierarchicalAttentionFunction.apply(q, k, v, problem, topology(problem, opts.intra_node_size), opts)
