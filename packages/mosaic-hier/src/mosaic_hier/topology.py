"""The sp group as a ``(nodes, L)`` grid: this rank's node, its local rank, and the two groups.

Sp rank ``r`` sits on node ``r // L`` with local rank ``r % L`` (contiguous
sp ranks share a node, as torchrun numbers them). The *intra* group is the
``L`` ranks of one node; the *inter* group, a "rail", is the ``nodes`` ranks
with the same local rank, one per node: with one NIC per GPU, each rail has
its own links. Both come from :meth:`mosaic.Context.grid` over the problem's
group (the sp group, or the group a composition hands on), which builds them
once per context and caches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from mosaic.sdk import AttentionProblem


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the ``(nodes, local)`` grid and the groups along each mesh axis."""

    nodes: int
    local: int
    node: int
    local_rank: int
    inter: dist.ProcessGroup
    intra: dist.ProcessGroup

    def rank_of(self, node: int, local_rank: int) -> int:
        """Rank in the problem's group of ``local_rank`` on ``node``."""
        return node * self.local + local_rank


def topology(problem: AttentionProblem, intra_node_size: int) -> Topology:
    """This rank's place in the hierarchy of ``problem``'s group (collective on first use)."""
    if problem.context is None:
        raise ValueError("the hierarchical backend needs the Context of mosaic.init(); the problem carries none")
    nodes = problem.size // intra_node_size
    grid = problem.context.grid((nodes, intra_node_size), ("inter", "intra"), problem.group)
    node, local_rank = grid.coords
    return Topology(nodes, intra_node_size, node, local_rank, grid.group("inter"), grid.group("intra"))
