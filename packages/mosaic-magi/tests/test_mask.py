"""The packing that keeps Mosaic's layout, its slices, its cost, and the plan's execution around MagiAttention.

The slices are checked against the dense mask they must describe (every
visible (query, key) pair covered exactly once, nothing else); the plan runs
with an emulated MagiAttention runtime that computes, in fp64, what FFA
computes for those slices on the packed sequence assembled from every
rank's shard, and must match attention on the unsharded tensors, forward
and backward.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mosaic.cost import attention_flops
from mosaic.layout import SeqLayout, shard, unshard
from mosaic.testing import make_problem
from mosaic_magi import MagiBackend, MagiOptions, pack_mask, padded_head_dim
from mosaic_magi.mask import PackedMask

# (name, ranks, length, layout, batch', causal, kv_len)
PROBLEMS = [
    ("one rank", 1, 13, "contiguous", 2, False, None),
    ("even", 2, 16, "contiguous", 3, False, None),
    ("uneven", 3, 13, "contiguous", 2, False, None),
    ("kv_len inside a shard", 3, 13, "contiguous", 2, False, 6),
    ("kv_len = 1", 4, 9, "contiguous", 1, False, 1),
    ("empty shards", 4, 2, "contiguous", 2, False, None),
    ("causal", 3, 12, "contiguous", 2, True, None),
    ("causal with kv_len", 2, 14, "contiguous", 2, True, 9),
    ("causal zigzag", 2, 16, "zigzag", 2, True, None),
    ("causal zigzag uneven with kv_len", 3, 17, "zigzag", 3, True, 11),
    ("zigzag full", 4, 18, "zigzag", 1, False, None),
]


def _problem(size, length, layout, batch, causal, kv_len, rank=0, **fields):
    lay = SeqLayout.even(length, size, layout)
    return make_problem(
        size=size, length=length, batch=batch, q_layout=lay, kv_layout=lay, causal=causal, kv_len=kv_len,
        rank=rank, backend="magi", **fields,
    )  # fmt: skip


def _positions(problem, mask: PackedMask) -> list[tuple[int, int] | None]:
    """Per packed token: (entry, global position), or None for a pad row."""
    out: list[tuple[int, int] | None] = [None] * mask.total
    for r in range(mask.size):
        local = [pos for a, b in problem.q_layout.spans(r) for pos in range(a, b)]
        for b in range(mask.batch):
            for i, pos in enumerate(local):
                out[r * mask.block + b * mask.rows + i] = (b, pos)
    return out


def _coverage(mask: PackedMask) -> torch.Tensor:
    """How often each (query token, key token) pair is attended under FFA's slice semantics."""
    count = torch.zeros(mask.total, mask.total, dtype=torch.int64)
    for (qa, qe), (ka, ke), causal in zip(mask.q_ranges, mask.k_ranges, mask.causal, strict=True):
        block = torch.ones(qe - qa, ke - ka, dtype=torch.int64)
        if causal:  # bottom-right aligned: the last query sees every key, each earlier one a key fewer
            block = block.tril(diagonal=(ke - ka) - (qe - qa))
        count[qa:qe, ka:ke] += block
    return count


def _expected(problem, mask: PackedMask) -> torch.Tensor:
    pos = _positions(problem, mask)
    want = torch.zeros(mask.total, mask.total, dtype=torch.int64)
    limit = problem.kv_layout.total if problem.kv_len is None else problem.kv_len
    for i, j in itertools.product(range(mask.total), repeat=2):
        if pos[i] and pos[j] and pos[i][0] == pos[j][0] and pos[j][1] < limit:
            want[i, j] = not problem.causal or pos[j][1] <= pos[i][1]
    return want


@pytest.mark.parametrize("case", PROBLEMS, ids=[c[0] for c in PROBLEMS])
@pytest.mark.parametrize("min_chunks", [1, 8])
def test_slices_cover_exactly_the_visible_pairs(case, min_chunks) -> None:
    _, size, length, layout, batch, causal, kv_len = case
    problem = _problem(size, length, layout, batch, causal, kv_len)
    mask = pack_mask(problem, min_chunks)
    assert torch.equal(_coverage(mask), _expected(problem, mask))
    # The sequential dispatch's chunks: exactly min_chunks per rank, and pad rows only for that rule.
    assert mask.block % mask.chunk_size == 0 and mask.block // mask.chunk_size == min_chunks
    longest = max(1, max(problem.q_layout.lengths))
    assert longest <= mask.rows < longest + min_chunks
    for r in range(size):
        assert mask.pairs(r) == batch * problem.pairs(r)


@pytest.mark.parametrize("case", PROBLEMS, ids=[c[0] for c in PROBLEMS])
def test_remote_keys_are_the_keys_other_ranks_hold(case) -> None:
    _, size, length, layout, batch, causal, kv_len = case
    problem = _problem(size, length, layout, batch, causal, kv_len)
    mask = pack_mask(problem)
    seen = _coverage(mask) > 0
    for r in range(size):
        lo, hi = r * mask.block, (r + 1) * mask.block
        needed = seen[lo:hi].any(0)
        needed[lo:hi] = False
        assert mask.remote_keys(r) == int(needed.sum())
        local = int(_coverage(mask)[lo:hi, lo:hi].sum())
        assert mask.pairs(r, local=True) == local


def test_padded_head_dims() -> None:
    assert [padded_head_dim(d) for d in (4, 24, 64, 65, 96, 128, 129)] == [64, 64, 64, 128, 128, 128, None]


def test_cost_counts_the_prefix_keys_fetched() -> None:
    """TabPFN's key prefix on 2 ranks: rank 1 fetches every key (all on rank 0), rank 0 none."""
    batch, length, heads, kv_len = 3, 64, 4, 32
    problem = _problem(2, length, "contiguous", batch, False, kv_len, heads=heads, head_dim=24, dtype=torch.bfloat16)
    plan = MagiBackend().plan(problem)
    assert plan.head_dim == 64
    assert plan.cost.bytes == 6 * batch * kv_len * heads * 64 * 2
    assert plan.cost.flops == attention_flops(batch, heads, 24, 32 * kv_len)
    assert plan.cost.collectives == 3
    # K/V fetched in the forward (a third of the bytes); fetched again and dK/dV reduced in the backward.
    assert 3 * plan.cost.forward.bytes == plan.cost.bytes
    # Rank 1 (the busiest: same pairs, more to fetch) has no local keys: nothing hides its fetch, one stage.
    assert plan.cost.forward.hidden == plan.cost.backward.hidden == 0.0
    one = MagiBackend().plan(_problem(1, length, "contiguous", batch, False, kv_len, heads=heads))
    assert (one.cost.bytes, one.cost.forward.hidden, one.cost.collectives) == (0, 0.0, 0)
    deeper = MagiBackend().plan(
        _problem(2, length, "contiguous", batch, False, None, heads=heads, options=MagiOptions(overlap_degree=4))
    )
    # 4 stages: every fetch hidden (the first under the local stage), 3 of 4 stages' dK/dV reduces.
    hidden = (2 * deeper.cost.forward.hidden + 4 * deeper.cost.backward.hidden) / 6  # weighted by the bytes
    assert deeper.cost.collectives == 12 and hidden == pytest.approx((4 + 2 * 3 / 4) / 6)


# --- the plan around an emulated MagiAttention ---------------------------------------------------------------------


class _EmulatedRuntime:
    """Stands in for one rank's DistAttnRuntimeMgr: FFA's result for this rank's queries, on the whole sequence.

    ``packed`` holds q, k, v of the whole packed sequence, built from the unsharded tensors (not by
    the plan); the rank's own block must be exactly what the plan passes, and is replaced by it, so
    gradients reach the shards through the plan's packing and the other ranks' rows through ``packed``.
    """

    def __init__(self, rank: int, mask: PackedMask, packed: list[torch.Tensor], scale: float) -> None:
        self.rank, self.mask, self.packed, self.scale = rank, mask, packed, scale

    def calc_attn(self, q, k, v, softmax_scale):
        lo, hi = self.rank * self.mask.block, (self.rank + 1) * self.mask.block
        assert softmax_scale == self.scale
        whole = []
        for got, want in zip((q, k, v), self.packed, strict=True):
            assert torch.equal(got, want[lo:hi])
            whole.append(torch.cat([want[:lo], got, want[hi:]]))
        return _ffa(*whole, self.mask, self.scale)[lo:hi], None


def _packed(x: torch.Tensor, positions, mask: PackedMask, head_dim: int) -> torch.Tensor:
    """(batch', heads, N, d) unsharded -> (tokens, heads, head_dim) in the packed order, zero pad rows and dims."""
    rows = [
        x.new_zeros(x.shape[1], head_dim)
        if where is None
        else F.pad(x[where[0], :, where[1]], (0, head_dim - x.shape[-1]))
        for where in positions
    ]
    return torch.stack(rows)


def _ffa(q, k, v, mask: PackedMask, scale: float) -> torch.Tensor:
    """FFA's result for the slices: softmax over each query's covered keys (GQA: kv head = head // group)."""
    visible = _coverage(mask) > 0
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)  # pad rows see nothing
    return torch.einsum("hqk,khd->qhd", weights, v)


def _reference(q, k, v, causal: bool, kv_len: int | None, scale: float) -> torch.Tensor:
    n = q.shape[2]
    visible = torch.ones(n, n, dtype=torch.bool)
    if kv_len is not None:
        visible[:, kv_len:] = False
    if causal:
        visible &= torch.ones_like(visible).tril()
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("case", PROBLEMS, ids=[c[0] for c in PROBLEMS])
def test_plan_runs_magi_on_the_packed_shards(case) -> None:
    _, size, length, layout, batch, causal, kv_len = case
    heads, kv_heads, head_dim = 4, 2, 24
    torch.manual_seed(0)
    full = [torch.randn(batch, h, length, head_dim, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(batch, heads, length, head_dim, dtype=torch.float64)
    kw = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float64)
    plans = [
        MagiBackend().plan(_problem(size, length, layout, batch, causal, kv_len, rank=r, **kw)) for r in range(size)
    ]
    mask, scale = plans[0].mask, plans[0].problem.scale
    assert all(p.mask == mask for p in plans), "every rank must plan the same sequence"
    leaves = [t.clone().requires_grad_() for t in full]
    positions = _positions(plans[0].problem, mask)
    packed = [_packed(t, positions, mask, plans[0].head_dim) for t in leaves]
    outs = []
    for r, plan in enumerate(plans):
        plan._runtime["mgr"] = _EmulatedRuntime(r, mask, packed, scale)
        # Strided inputs, as Mosaic hands them (views of a projection).
        y = plan(*(shard(t, 2, r, size, layout).transpose(1, 2).contiguous().transpose(1, 2) for t in leaves))
        assert y.shape == (batch, heads, plan.problem.q_layout.lengths[r], head_dim)
        outs.append(y)
    got = unshard(outs, 2, layout)
    ref_leaves = [t.clone().requires_grad_() for t in full]
    want = _reference(*ref_leaves, causal, kv_len, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got.backward(grad)
    want.backward(grad)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
