"""The block planner against a brute-force visibility mask, and plan execution against exact attention."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from mosaic import blockwise


def _positions(spans):
    return [p for a, b in spans for p in range(a, b)]


def _visible(q_spans, k_spans, causal, kv_len):
    q, k = _positions(q_spans), _positions(k_spans)
    return torch.tensor([[(kv_len is None or kj < kv_len) and (not causal or kj <= qi) for kj in k] for qi in q])


def _covered(pieces, n_q, n_k):
    """How many times each (query row, key row) pair is computed; causal pieces cover their lower triangle."""
    count = torch.zeros(n_q, n_k, dtype=torch.int64)
    for p in pieces:
        block = torch.ones(p.q.stop - p.q.start, p.k.stop - p.k.start, dtype=torch.int64)
        if p.causal:
            assert block.shape[0] == block.shape[1], "causal pieces must be square"
            block = block.tril()
        count[p.q, p.k] += block
    return count


def _random_spans(rng, total, parts):
    parts = min(parts, total)
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    bounds = [0, *cuts, total]
    spans = [(a, b) for a, b in itertools.pairwise(bounds)]
    chosen = sorted(rng.sample(spans, rng.randint(1, len(spans))))
    return tuple(chosen)


@pytest.mark.parametrize("seed", range(200))
def test_plan_computes_each_visible_pair_exactly_once(seed):
    rng = random.Random(seed)
    total = rng.randint(2, 24)
    q_spans = _random_spans(rng, total, rng.randint(1, 4))
    k_spans = _random_spans(rng, total, rng.randint(1, 4))
    if rng.random() < 0.3:  # keys out of position order, as an all-gather of zigzag shards gives
        k_spans = tuple(rng.sample(k_spans, len(k_spans)))
    causal = rng.random() < 0.6
    kv_len = rng.choice([None, rng.randint(1, total)])
    pieces = blockwise.blocks(q_spans, k_spans, causal=causal, kv_len=kv_len)
    want = _visible(q_spans, k_spans, causal, kv_len).long()
    assert torch.equal(_covered(pieces, want.shape[0], want.shape[1]), want)


def test_same_positions_give_one_causal_block():
    spans = ((0, 4), (12, 16))
    assert blockwise.blocks(spans, spans, causal=True) == [blockwise.Piece(slice(0, 8), slice(0, 8), causal=True)]


def test_full_blocks_are_coalesced():
    pieces = blockwise.blocks(((8, 12),), ((0, 3), (3, 6)), causal=True)
    assert pieces == [blockwise.Piece(slice(0, 4), slice(0, 6))]


@pytest.mark.parametrize("causal", [False, True])
def test_span_attention_matches_masked_attention(causal):
    torch.manual_seed(0)
    q_spans, k_spans, kv_len = ((2, 7), (12, 15)), ((0, 5), (9, 16)), 14
    q = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 12, 8, dtype=torch.float64, requires_grad=True)
    out = blockwise.span_attention(q, k, v, q_spans, k_spans, causal=causal, kv_len=kv_len, scale=8**-0.5)
    mask = _visible(q_spans, k_spans, causal, kv_len)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ v
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_no_query_rows_still_depends_on_keys():
    q = torch.randn(1, 2, 0, 8, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, requires_grad=True)
    out = blockwise.span_attention(q, k, k, (), ((0, 5),), scale=1.0)
    assert out.shape == (1, 2, 0, 8) and out.grad_fn is not None
    (grad_k,) = torch.autograd.grad(out.sum(), k)
    assert torch.equal(grad_k, torch.zeros_like(k))
