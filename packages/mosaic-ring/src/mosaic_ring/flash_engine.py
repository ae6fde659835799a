"""``ring_flash_attn``: Mosaic's routing in front of ring-flash-attn's ring (an optional engine).

Mosaic hands every backend ``(batch, heads, seq_local, head_dim)``;
ring-flash-attn takes ``(batch, seq_local, heads, head_dim)``, so q, k and v go
in as transposed views (flash-attn only needs the last dim to have stride 1) and
the output comes back transposed the same way. Full attention runs
``ring_flash_attn_func``; causal attention runs ``zigzag_ring_flash_attn_func``,
whose sharding is Mosaic's zigzag layout with equal chunks: the sequence is cut
into ``2P`` chunks and rank ``r`` holds chunk ``r`` then chunk ``2P - 1 - r``.
Grouped kv heads go to flash-attn as they are (it supports GQA natively);
ring-flash-attn's functions are autograd Functions, so gradients reach q, k, v
and through them the projections.

Nothing here imports flash-attn or ring-flash-attn until the backend runs on a
CUDA input; probing for them uses ``find_spec``. ring-flash-attn 0.1.8's package
``__init__`` imports its Hugging Face adapter, which needs ``transformers`` below
5, and importing any of its submodules the usual way runs that ``__init__``
first. So the two algorithm modules are loaded from the installed package's
folder under a private package name, which never runs the adapter and works
with any transformers, or none.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib.util import find_spec

import torch

from mosaic.sdk import CUDA_MAX_BATCH_HEADS, AttentionProblem, Backend, Capabilities, Plan

from .ring import ring_cost

__all__ = ["RingFlashAttnBackend", "load_engine", "missing_packages"]

EXTRA = "mosaic-ring[flash]"
# (import name, distribution name) of what the engine needs.
REQUIRED = (("ring_flash_attn", "ring-flash-attn"), ("flash_attn", "flash-attn"))
# ring-flash-attn's algorithm modules live here, apart from its own package name.
_PRIVATE_PACKAGE = "_mosaic_ring_flash_attn"
# flash-attn 2 kernels need Ampere or newer.
_MIN_CAPABILITY = (8, 0)
_FA2_SLOWDOWN = 1.23

AttentionFn = Callable[..., torch.Tensor]


def missing_packages() -> list[str]:
    """Distributions the engine needs that are not installed (found without importing them)."""
    return [dist for module, dist in REQUIRED if find_spec(module) is None]


@cache
def load_engine() -> tuple[AttentionFn, AttentionFn]:
    """ring-flash-attn's ``ring_flash_attn_func`` and ``zigzag_ring_flash_attn_func``, imported on first use."""
    spec = find_spec("ring_flash_attn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"ring-flash-attn is not installed: pip install '{EXTRA}'")
    package = sys.modules.get(_PRIVATE_PACKAGE)
    if package is None:
        package = types.ModuleType(_PRIVATE_PACKAGE, "ring-flash-attn's algorithm modules, loaded by mosaic-ring")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[_PRIVATE_PACKAGE] = package
    ring = importlib.import_module(f"{_PRIVATE_PACKAGE}.ring_flash_attn")
    zigzag = importlib.import_module(f"{_PRIVATE_PACKAGE}.zigzag_ring_flash_attn")
    return ring.ring_flash_attn_func, zigzag.zigzag_ring_flash_attn_func


def _import_error() -> str | None:
    try:
        load_engine()
    except Exception as exc:  # a broken flash-attn build must become a reason, not a stack trace
        return f"ring-flash-attn or flash-attn failed to import ({type(exc).__name__}: {exc})"
    return None


class RingFlashAttnBackend(Backend):
    """Sequence parallelism by ring-flash-attn (flash-attn 2 kernels), sharded and routed by Mosaic."""

    name = "ring_flash_attn"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        kv_len=False,
        max_head_dim=256,
    )

    def environment_reasons(self) -> list[str]:
        """Why the engine can't run here whatever the input (missing packages); empty when installed."""
        return [f"{dist} is not installed: pip install '{EXTRA}'" for dist in missing_packages()]

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        p = problem
        reasons = self.environment_reasons()
        if not reasons and p.device.type == "cuda" and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(p.device)
            if capability < _MIN_CAPABILITY:
                reasons.append(f"flash-attn 2 needs compute capability >= {_MIN_CAPABILITY}, the GPU has {capability}")
            elif error := _import_error():
                reasons.append(error)
        if p.group is None:
            reasons.append(
                "needs torch.distributed initialised: ring-flash-attn asks the process group for ranks "
                "(launch with torchrun, also for one process)"
            )
        if p.head_dim % 8:
            reasons.append(f"head dim {p.head_dim} is not a multiple of 8 (flash-attn's kernels need one)")
        # Self-attention keys are the queries: one sentence is enough.
        shards = [("queries", p.q_layout)] + ([("keys", p.kv_layout)] if p.cross else [])
        for what, layout in shards:
            if len(set(layout.lengths)) > 1:
                reasons.append(
                    f"needs equal shards, but the sp ranks hold {list(layout.lengths)} {what} along the attention "
                    f"dim (ring-flash-attn passes equal-sized blocks); make the length divisible by {p.size}"
                )
        if p.causal:
            reasons += self._causal_reasons(p)
        elif p.dtype == torch.float16:
            # ring_flash_attn_backward ends in dq.to(torch.bfloat16): fp16 dQ would lose 3 mantissa bits.
            reasons.append(
                "float16 full attention: ring-flash-attn's ring_flash_attn_func returns dQ rounded to bfloat16; "
                "use bfloat16 or backend='ring'"
            )
        return reasons

    @staticmethod
    def _causal_reasons(p: AttentionProblem) -> list[str]:
        reasons = []
        if p.cross:
            reasons.append(
                "causal cross-attention: zigzag_ring_flash_attn_func assumes queries and keys share positions"
            )
        if p.q_layout.kind != "zigzag":
            reasons.append(
                "causal=True needs layout='zigzag' (zigzag_ring_flash_attn_func): build the module with "
                "layout='zigzag' and shard inputs with ctx.shard(x, dim, 'zigzag')"
            )
        elif p.q_layout.total % (2 * p.size):
            reasons.append(
                f"causal zigzag needs {2 * p.size} equal chunks (2 per rank): the length {p.q_layout.total} is not "
                f"divisible by {2 * p.size}"
            )
        return reasons

    def plan(self, problem: AttentionProblem) -> Plan:
        cost = ring_cost(problem)
        # flash-attn 2's kernels ran 1.23x slower than cuDNN at head dim 24 on an H200 (docs/benchmarks.md).
        slower = lambda step: replace(step, flops=step.flops * _FA2_SLOWDOWN)
        return RingFlashPlan(problem, replace(cost, forward=slower(cost.forward), backward=slower(cost.backward)))


@dataclass(frozen=True)
class RingFlashPlan(Plan):
    """ring-flash-attn's ring or zigzag ring over the problem's group."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.problem
        ring, zigzag = load_engine()
        attend = zigzag if p.causal else ring
        # flash-attn puts the batch on a CUDA grid dim: run the ring once per slice of at most 65535.
        outs = [
            attend(
                *(t[i : i + CUDA_MAX_BATCH_HEADS].transpose(1, 2) for t in (q, k, v)),
                dropout_p=0.0,
                softmax_scale=p.scale,
                causal=p.causal,
                group=p.group,
            ).transpose(1, 2)
            for i in range(0, q.shape[0], CUDA_MAX_BATCH_HEADS)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
