"""Layouts: spans per rank, shard/unshard round trips, zigzag order."""

from __future__ import annotations

import pytest
import torch

from mosaic.layout import SeqLayout, from_zigzag, shard, split_sizes, to_zigzag, unshard


@pytest.mark.parametrize("total,size", [(10, 4), (8, 4), (3, 4), (7, 1), (13, 3)])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_spans_cover_every_position_once(total, size, kind):
    layout = SeqLayout.even(total, size, kind)
    positions = [p for r in range(size) for a, b in layout.spans(r) for p in range(a, b)]
    assert sorted(positions) == list(range(total))
    assert [sum(b - a for a, b in layout.spans(r)) for r in range(size)] == list(layout.lengths)


def test_contiguous_follows_tensor_split():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert SeqLayout.even(10, 4).spans(1) == ((3, 6),)


def test_zigzag_pairs_first_and_last_chunks():
    layout = SeqLayout.even(16, 4, "zigzag")
    assert layout.spans(0) == ((0, 2), (14, 16))
    assert layout.spans(3) == ((6, 8), (8, 10))


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("total,size", [(11, 3), (16, 4), (5, 2)])
def test_shard_unshard_round_trip(kind, total, size):
    x = torch.arange(total * 2.0).view(2, total)
    parts = [shard(x, 1, r, size, kind) for r in range(size)]
    layout = SeqLayout.even(total, size, kind)
    for r, part in enumerate(parts):
        expected = torch.cat([x[:, a:b] for a, b in layout.spans(r)], 1)
        assert torch.equal(part, expected)
    assert torch.equal(unshard(parts, 1, kind), x)


def test_zigzag_reorder_round_trip():
    x = torch.randn(3, 13, 2)
    assert torch.equal(from_zigzag(to_zigzag(x, 1, 3), 1, 3), x)


def test_lengths_that_are_not_zigzag_are_rejected():
    with pytest.raises(ValueError, match="do not follow the zigzag layout"):
        SeqLayout((5, 3), "zigzag")
    with pytest.raises(ValueError, match="unknown layout"):
        SeqLayout((5, 3), "striped")
