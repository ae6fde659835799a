"""The strategy SDK: everything a backend package imports from Mosaic, in one module.

A strategy (in-tree or third-party) is a :class:`Backend` that prices and
plans an :class:`AttentionProblem` and a frozen :class:`Plan` that runs it
with these pieces: blocks and their kernels (:func:`blocks`, :func:`accumulate`,
:func:`block_grads`, ...), collectives over uneven shards and rings
(:func:`start_all_gather`, :func:`rotate`, ...), and the costs that price it.
docs/architecture.md ("The backend contract") says what a plan receives and
the rules it keeps; ``mosaic.testing.run_conformance`` checks them. Importing
from here, and only here, is what the core keeps stable for plugins.

    from mosaic.sdk import Backend, Capabilities, Cost, Pass, Plan, AttentionProblem, blocks, rotate
"""

from __future__ import annotations

from . import blockwise
from .agreement import site_id
from .attention import MultiAxisAttention, fold, unfold
from .backend import Backend, Capabilities, Plan
from .blockwise import (
    Partial,
    Piece,
    SpanAttention,
    accumulate,
    backward_,
    block_grads,
    blocks,
    cut_spans,
    empty_partial,
    merge_,
)
from .blockwise import forward as block_forward
from .comm import (
    Pace,
    RingComm,
    all_gather_uneven,
    all_to_all_uneven,
    count_traffic,
    reduce_scatter_uneven,
    resized,
    rotate,
    rotate_back,
    start_all_gather,
    start_reduce_scatter,
)
from .context import Context, get_context
from .cost import Cost, Pass, attention_flops, attention_passes
from .errors import BackendNotSupported, BackendUnavailable
from .functional import Call, LayoutRule, attend
from .groups import Grid
from .kernels import CUDA_MAX_BATCH_HEADS, BlockSpec, Kernel, KernelCall, lse_dtype
from .layout import LAYOUTS, SeqLayout, Span, split_sizes
from .local import SpanPlan, span_plan
from .options import NoOptions, Options, check_positive_int, check_shape
from .plans import plan_inner
from .problem import AttentionProblem, KeyBlock, kv_len_int
from .registry import get_backend

__all__ = [
    "CUDA_MAX_BATCH_HEADS",
    "LAYOUTS",
    "AttentionProblem",
    "Backend",
    "BackendNotSupported",
    "BackendUnavailable",
    "BlockSpec",
    "Call",
    "Capabilities",
    "Context",
    "Cost",
    "Grid",
    "Kernel",
    "KernelCall",
    "KeyBlock",
    "LayoutRule",
    "MultiAxisAttention",
    "NoOptions",
    "Options",
    "Pace",
    "Partial",
    "Pass",
    "Piece",
    "Plan",
    "RingComm",
    "SeqLayout",
    "Span",
    "SpanAttention",
    "SpanPlan",
    "accumulate",
    "all_gather_uneven",
    "all_to_all_uneven",
    "attend",
    "attention_flops",
    "attention_passes",
    "backward_",
    "block_forward",
    "block_grads",
    "blocks",
    "blockwise",
    "check_positive_int",
    "check_shape",
    "count_traffic",
    "cut_spans",
    "empty_partial",
    "fold",
    "get_backend",
    "get_context",
    "kv_len_int",
    "lse_dtype",
    "merge_",
    "plan_inner",
    "reduce_scatter_uneven",
    "resized",
    "rotate",
    "rotate_back",
    "site_id",
    "span_plan",
    "split_sizes",
    "start_all_gather",
    "start_reduce_scatter",
    "unfold",
]
