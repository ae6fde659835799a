"""``HierarchicalAttention``: ``MultiAxisAttention`` on the ``hierarchical`` backend."""

from __future__ import annotations

from typing import Any

from mosaic.sdk import MultiAxisAttention

__all__ = ["HierarchicalAttention"]


class HierarchicalAttention(MultiAxisAttention):
    """Multi-head attention whose sharded axis runs one strategy inside each node and one across nodes.

    The same as ``MultiAxisAttention(..., backend="hierarchical", backend_options={"intra_node_size": L,
    "inter_node_strategy": ..., "intra_node_strategy": ...})``.

    Args:
        intra_node_size: ``L``, ranks per node; contiguous sp ranks form a node and ``L``
            must divide the sp size (normally torchrun's ``LOCAL_WORLD_SIZE``).
        inter_node_strategy: ``"ring"`` or ``"allgather"``, over the rails (one rank per node).
        intra_node_strategy: ``"allgather"``, ``"ring"`` or ``"ulysses"`` (needs mosaic-compose),
            within each node.
        embed_dim: size of the last dim.
        num_heads: query heads.
        attention_axis: the tensor dim to attend over.
        **kwargs: the other keyword arguments of :class:`mosaic.MultiAxisAttention`
            (``num_kv_heads``, ``bias``, ``layout``, ``device``, ``dtype``, ...).
    """

    def __init__(
        self,
        intra_node_size: int,
        inter_node_strategy: str = "ring",
        intra_node_strategy: str = "allgather",
        *,
        embed_dim: int,
        num_heads: int,
        attention_axis: int,
        **kwargs: Any,
    ):
        options = {
            "intra_node_size": intra_node_size,
            "inter_node_strategy": inter_node_strategy,
            "intra_node_strategy": intra_node_strategy,
        }
        super().__init__(
            embed_dim, num_heads, attention_axis, backend="hierarchical", backend_options=options, **kwargs
        )

    def extra_repr(self) -> str:
        o = self.backend_options
        return (
            f"{super().extra_repr()}, intra_node_size={o['intra_node_size']}, "
            f"inter_node_strategy={o['inter_node_strategy']!r}, intra_node_strategy={o['intra_node_strategy']!r}"
        )
