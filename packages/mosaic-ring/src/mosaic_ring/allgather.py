"""``allgather``: gather K/V once, attend the local queries to all keys.

Only key rows below ``kv_len`` are gathered (a rank holding none sends
nothing), so the TabPFN train/test split moves and computes only the train
rows. The backward reduce-scatters dK/dV (summed in fp32) to their owners.

Per rank: communication ``(P-1)/P * N' * 2 * Hkv * d`` elements each way
(``N'`` = keys kept), memory ``O(N' * Hkv * d)`` for the gathered K/V.
"""

from __future__ import annotations

import torch

from mosaic.backend import Backend, Capabilities
from mosaic.blockwise import span_attention
from mosaic.comm import gather_along
from mosaic.problem import AttentionProblem


class AllGatherBackend(Backend):
    """KV all-gather ("llama3-style") sequence parallelism."""

    name = "allgather"
    capabilities = Capabilities()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
        p = problem
        if p.size == 1:
            return span_attention(q, k, v, p.q_spans, p.kv_spans(), causal=p.causal, kv_len=p.kv_len, scale=p.scale)
        blocks = [p.kv_block(r) for r in range(p.size)]
        mine = blocks[p.rank]
        # K and V travel as one tensor: one collective each way instead of two.
        kv = torch.stack([mine.take(k), mine.take(v)])
        kv = gather_along(kv, [b.size for b in blocks], 3, p.group)
        key_spans = tuple(span for b in blocks for span in b.spans)
        return span_attention(q, kv[0], kv[1], p.q_spans, key_spans, causal=p.causal, scale=p.scale)
