"""``magi``: MagiAttention's distributed attention under Mosaic's API (an optional engine).

MagiAttention (SandAI, Apache-2.0) runs context-parallel attention over one
packed sequence: a *key* built once from the mask and the cp group maps to a
runtime (dispatch, communication and kernel meta), and ``calc_attn`` runs its
flexible flash attention (FFA) kernels on the local tokens, fetching the
remote keys and values each rank's slices need (a group-cast, overlapped with
the local stage) and, in the backward, fetching them again and reducing dK/dV
back to their owners (a group-reduce).

Mosaic drives it without moving a token: the sp group is the cp group, and
:mod:`mosaic_magi.mask` packs every rank's ``(batch', heads, rows, head_dim)``
shard as that rank's block of the packed sequence, with slices for the
problem (batch' entries, ``kv_len`` as each entry's key prefix, causal as
CAUSAL slices, contiguous or zigzag shards, uneven ones padded), and asks
for MagiAttention's sequential dispatch, which hands each rank the block it
already holds. The plan checks that MagiAttention's dispatch came out as that
identity before running. The alternative, MagiAttention's own load-balancing
dispatch, would need an all-to-all of q, k, v and the output (and of dO, dQ,
dK, dV in the backward) from Mosaic's layout and back: docs/magi.md has the
measured comparison.

Per rank and call (forward + backward): FFA over the rank's visible
(query, key) pairs; communication ``6 x R x Hkv x d_pad`` elements, ``R`` =
the other ranks' keys below ``kv_len`` that its queries see (K and V fetched
in the forward, again in the backward, dK and dV reduced); memory for the
packed copies of q, k, v and the output, the fp32 accumulators and the
fetched K/V. Head dims are zero-padded to 64 or 128 (FFA's kernels; the
softmax scale stays the problem's), and GQA is FFA's own.

Nothing here imports MagiAttention until a plan runs: probing uses
``find_spec``, and the CUDA checks import it only on a Hopper GPU.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.util import find_spec
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mosaic.sdk import AttentionProblem, Backend, Capabilities, Cost, Options, Pass, Plan, attention_passes

from .mask import FFA_HEAD_DIMS, PackedMask, pack_mask, padded_head_dim

__all__ = [
    "INSTALL_HINT",
    "MagiBackend",
    "MagiOptions",
    "MagiPlan",
    "gpu_reasons",
    "is_installed",
    "load_api",
    "magi_cost",
]

INSTALL_HINT = (
    "MagiAttention is not installed; it is not on the package index: build it from its source "
    "(https://github.com/SandAI-org/MagiAttention, on a Hopper GPU) or install a wheel built from it with "
    "pip install --no-deps magi_attention-*.whl (docs/magi.md)"
)
# The FFA kernels of this build are Hopper's (its FA4 backend for Blackwell is not part of it).
_CAPABILITY = (9, 0)
# MagiAttention's ranges are int32 token indices.
_MAX_TOKENS = 2**31 - 1
# MagiAttention's MAGI_ATTENTION_MIN_CHUNKS_PER_RANK (magi_attention.env.general.min_chunks_per_rank), read
# here without importing it so that planning (which backend="auto" does for every candidate) needs no import.
_MIN_CHUNKS_ENV, _MIN_CHUNKS_DEFAULT = "MAGI_ATTENTION_MIN_CHUNKS_PER_RANK", 8
# The engine at P = 1 against cuDNN, fwd + bwd, one H200 (docs/magi.md): 2 % faster on nanoTabPFN's row shape,
# 0-10 % slower on DESIGN.md §6's: taken as even.
_FFA_VS_CUDNN = 1.0


@dataclass(frozen=True)
class MagiOptions(Options):
    """Options of ``magi``.

    Args:
        overlap_degree: MagiAttention's remote stages: each fetches part of the remote K/V while
            the previous stage computes. 1 (its default): the local stage hides one fetch;
            ``None``: its solver picks the degree.
        atomic_forward: run every forward stage with FFA's atomic-reduction kernel. MagiAttention
            picks a non-atomic kernel for a first stage whose query ranges do not overlap; that is
            a second kernel to JIT-compile per dtype and head dim (minutes, once per machine) and
            not in a JIT cache of the default kernels. ``False`` lets MagiAttention choose.
    """

    overlap_degree: int | None = 1
    atomic_forward: bool = True

    def __post_init__(self) -> None:
        degree = self.overlap_degree
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 64):
            # 64: MagiAttention's OverlapConfig.max_num_chunks, which bounds the degree
            raise ValueError(f"option overlap_degree must be an int in [1, 64] or None, got {degree!r}")
        if not isinstance(self.atomic_forward, bool):
            raise ValueError(f"option atomic_forward must be a bool, got {self.atomic_forward!r}")


def is_installed() -> bool:
    """Whether MagiAttention is installed (found without importing it)."""
    return find_spec("magi_attention") is not None


@cache
def load_api() -> types.ModuleType:
    """``magi_attention.api``, imported on first use."""
    if not is_installed():
        raise ImportError(INSTALL_HINT)
    import magi_attention.api as api

    return api


def gpu_reasons(device: torch.device, load: Callable[[], object]) -> list[str]:
    """Why MagiAttention can't run on ``device`` once installed: not Hopper, or ``load()`` (its import) fails."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    capability = torch.cuda.get_device_capability(device)
    if capability != _CAPABILITY:
        return [
            f"MagiAttention's FFA kernels need compute capability {_CAPABILITY} (Hopper, sm_90), "
            f"the GPU has {capability}"
        ]
    try:
        load()
    except Exception as exc:  # a broken build must become a reason, not a stack trace
        return [f"MagiAttention failed to import ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]
    return []


class MagiBackend(Backend):
    """Sequence parallelism by MagiAttention (FFA kernels, group-cast K/V), sharded and routed by Mosaic."""

    name = "magi"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        # magi_attention 1.1 dispatches self-attention only: is_same_source=False raises NotImplementedError.
        cross_attention=False,
        max_head_dim=FFA_HEAD_DIMS[-1],
    )
    Options = MagiOptions

    def environment_reasons(self) -> list[str]:
        """Why the engine can't run here whatever the input (not installed); empty when installed."""
        return [] if is_installed() else [INSTALL_HINT]

    def extra_reasons(self, problem: AttentionProblem) -> list[str]:
        p = problem
        reasons = self.environment_reasons() or gpu_reasons(p.device, load_api)
        if p.group is None:
            reasons.append(
                "needs torch.distributed initialised: MagiAttention takes the sp group as its cp group "
                "(launch with torchrun, also for one process)"
            )
        elif isinstance(p.group, dist.ProcessGroup) and (backend := dist.get_backend(p.group)) != "nccl":
            reasons.append(f"MagiAttention's cp group must use NCCL; the sp group uses {backend}")
        if os.environ.get("MAGI_ATTENTION_HIERARCHICAL_COMM", "0") == "1":
            reasons.append(
                "MAGI_ATTENTION_HIERARCHICAL_COMM=1 needs a 2-D device mesh as the cp group; Mosaic passes "
                "its sp group (unset it)"
            )
        if p.q_layout.total == 0:
            reasons.append("the attention dim has no positions (MagiAttention needs at least one query)")
        tokens = p.size * p.batch * (max(p.q_layout.lengths) + _min_chunks())
        if tokens > _MAX_TOKENS:
            reasons.append(
                f"the packed sequence would hold about {tokens} tokens (batch' {p.batch} x the longest shard x "
                f"{p.size} ranks); MagiAttention's ranges are int32: at most {_MAX_TOKENS}"
            )
        return reasons

    def plan(self, problem: AttentionProblem) -> MagiPlan:
        mask = pack_mask(problem, _min_chunks())
        head_dim = padded_head_dim(problem.head_dim)
        if head_dim is None:  # check() refused it already
            raise ValueError(f"head dim {problem.head_dim} > 128")
        return MagiPlan(problem, magi_cost(problem, mask, head_dim), mask, head_dim)


def _min_chunks() -> int:
    return int(os.environ.get(_MIN_CHUNKS_ENV, _MIN_CHUNKS_DEFAULT))


def magi_cost(problem: AttentionProblem, mask: PackedMask, head_dim: int) -> Cost:
    """The busiest rank's cost of one call (forward + backward) of the plan for ``problem``."""
    p = problem
    options = p.options if isinstance(p.options, MagiOptions) else MagiOptions()
    size = p.dtype.itemsize
    pairs = [p.pairs(r) for r in range(p.size)]
    busiest = max(range(p.size), key=lambda r: (pairs[r], mask.remote_keys(r)))
    remote = max(mask.remote_keys(r) for r in range(p.size))
    forward, backward = (f * _FFA_VS_CUDNN for f in attention_passes(p.batch, p.heads, p.head_dim, pairs[busiest]))
    # K, V fetched in the forward (2 tensors of R rows); fetched again in the backward and dK, dV reduced back (4).
    unit = remote * p.kv_heads * head_dim * size
    fetch_hidden = reduce_hidden = 0.0
    degree = 0
    if p.size > 1 and remote:
        # Stage i + 1's fetch runs under stage i's compute, and stage i's dK/dV reduce under stage i + 1's:
        # all but the first stage's fetches need remote compute, the first stage's the local stage's (none on
        # a rank that holds no keys it sees); of the reduces the last stage's is waited for.
        degree = options.overlap_degree or 2  # None: MagiAttention's solver picks; 2 is a middling guess
        has_local = 1.0 if mask.pairs(busiest, local=True) else 0.0
        fetch_hidden, reduce_hidden = (degree - 1 + has_local) / degree, (degree - 1) / degree
    tokens = mask.block
    packed = tokens * (2 * p.heads + 2 * p.kv_heads) * head_dim * size  # q, k, v, out in the packed layout
    accumulators = tokens * p.heads * (head_dim + 1) * 4  # fp32 out and lse (dQ in the backward)
    fetched = remote * 2 * p.kv_heads * head_dim * (size + 4)  # remote K/V, and their fp32 dK/dV partials
    return Cost(
        Pass(forward, 2 * unit, fetch_hidden, degree),
        Pass(backward, 4 * unit, (fetch_hidden + reduce_hidden) / 2, 2 * degree),
        memory=packed + accumulators + fetched,
    )


@dataclass(frozen=True)
class MagiPlan(Plan):
    """MagiAttention's runtime for the packed problem: built on first call, then only executed."""

    mask: PackedMask
    head_dim: int
    # The runtime manager, built on the first call: backend="auto" plans every candidate for its
    # cost, and MagiAttention's solver (with its collectives) should run only for the one that runs.
    _runtime: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def manager(self) -> Any:
        """MagiAttention's ``DistAttnRuntimeMgr`` of this plan (collective over the sp group on first use)."""
        mgr = self._runtime.get("mgr")
        if mgr is None:
            mgr = self._runtime["mgr"] = self._build()
        return mgr

    def _build(self) -> Any:
        api = load_api()
        from magi_attention.common import AttnRanges

        p, m = self.problem, self.mask
        options = p.options if isinstance(p.options, MagiOptions) else MagiOptions()
        degree = options.overlap_degree
        overlap = (
            api.OverlapConfig(degree=degree)
            if degree is not None
            else api.OverlapConfig(mode=api.AttnOverlapMode.DYNAMIC, degree=None)
        )
        config = api.DistAttnConfig(
            dispatch_config=api.DispatchConfig(chunk_size=m.chunk_size, alg=api.SequentialDispatchAlg()),
            overlap_config=overlap,
        )
        key = api.magi_attn_flex_key(
            q_ranges=AttnRanges.from_ranges([list(r) for r in m.q_ranges]),
            k_ranges=AttnRanges.from_ranges([list(r) for r in m.k_ranges]),
            attn_mask_type=m.mask_types(),
            total_seqlen_q=m.total,
            total_seqlen_k=m.total,
            num_heads_q=p.heads,
            num_heads_kv=p.kv_heads,
            head_dim=self.head_dim,
            pad_size=0,
            cp_group_or_mesh=p.group,
            dist_attn_config=config,
        )
        # The manager itself, not the key: MagiAttention's own cache is an LRU that could drop it.
        mgr = api.dist_attn_runtime_dict_mgr.get(key)
        _check_identity(key, mgr, m, p.rank)
        if options.atomic_forward:
            calc = mgr.dist_attn_runtime.calc_meta
            for arg in (calc.local_attn_arg, *calc.remote_attn_args_list):
                if hasattr(arg, "disable_fwd_atomic_reduction"):
                    arg.disable_fwd_atomic_reduction = False
        return mgr

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, m = self.problem, self.mask
        mgr = self.manager()
        rows = q.shape[2]
        out, _ = mgr.calc_attn(*(_pack(t, m.rows, self.head_dim) for t in (q, k, v)), softmax_scale=p.scale)
        # (batch' x rows_padded, heads, d_pad) -> (batch', heads, rows, d): a view of MagiAttention's output.
        return out.unflatten(0, (p.batch, m.rows))[:, :rows, :, : p.head_dim].transpose(1, 2)


def _pack(t: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor:
    """``(batch', heads, n, d)`` as ``(batch' x rows, heads, head_dim)``, zero-padded: one copy, differentiable."""
    b, h, n, d = t.shape
    x = t.transpose(1, 2)
    if rows != n or head_dim != d:
        x = F.pad(x, (0, head_dim - d, 0, 0, 0, rows - n))
    return x.reshape(b * rows, h, head_dim)


def _check_identity(key: Any, mgr: Any, mask: PackedMask, rank: int) -> None:
    """MagiAttention's dispatch must hand every rank its own block in order, or the plan would attend wrong rows."""
    meta = mgr.dispatch_meta_q
    per_rank = mask.total // key.chunk_size // mask.size if key.chunk_size else 0
    expected = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(mask.size)]
    if mask.size == 1:
        expected = [[0]]  # MagiAttention's one-rank shortcut: one chunk of the whole sequence
    if key.pad_size or meta.partitions != expected or meta.shard_seqlen != mask.block:
        raise RuntimeError(
            f"MagiAttention's sequential dispatch did not keep Mosaic's layout on rank {rank}: partitions "
            f"{meta.partitions} (expected {expected}), padding {key.pad_size}, {meta.shard_seqlen} local tokens "
            f"(expected {mask.block}); this version of MagiAttention dispatches differently"
        )
