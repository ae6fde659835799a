"""Placement of ring transfers (mosaic.comm.Pace): which end starts a transfer after its compute."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from mosaic.comm import Pace


def _pace(busy: list[list[bool]], rank: int, reverse: bool = False) -> Pace:
    size = len(busy)
    step = -1 if reverse else 1
    comm = SimpleNamespace(rank=rank, next_rank=(rank + step) % size, prev_rank=(rank - step) % size)
    steps = range(size - 1, -1, -1) if reverse else range(size)
    return Pace(busy, comm, steps)  # type: ignore[arg-type]


def _busy(keys: list[int]) -> list[list[bool]]:
    """The ring's busy table when rank r holds keys[r] key rows and every rank holds queries."""
    size = len(keys)
    return [[keys[(g - s) % size] > 0 for s in range(size)] for g in range(size)]


def test_balanced_ring_starts_everything_with_the_compute() -> None:
    busy = _busy([5, 5, 5, 5])
    for rank, reverse, step in itertools.product(range(4), (False, True), range(4)):
        pace = _pace(busy, rank, reverse)
        assert not pace.late(step, (rank + 1) % 4) and not pace.late(step, (rank - 1) % 4)


def test_prefix_on_two_ranks_owner_receives_its_accumulator_after_computing() -> None:
    # kv_len = N/2: rank 0 holds every key. Backward runs steps 1, 0; at step 0 rank 0 computes its own
    # block while rank 1 has already computed block 0 at step 1: rank 0 receives after its compute.
    busy = _busy([8, 0])
    assert busy == [[True, False], [False, True]]
    assert _pace(busy, 0, reverse=True).late(0, 1)
    assert not _pace(busy, 1, reverse=True).late(0, 0)  # rank 1 sends as soon as it may
    assert not _pace(busy, 0).late(0, 1)  # forward: block 0 leaves at once


def test_prefix_on_four_ranks_late_only_at_the_earlier_end() -> None:
    busy = _busy([8, 8, 0, 0])
    for reverse in (False, True):
        paces = [_pace(busy, r, reverse) for r in range(4)]
        for step, r in itertools.product(range(4), range(4)):
            for peer in ((r + 1) % 4, (r - 1) % 4):
                if paces[r].late(step, peer):
                    # Never both ends: the later end starts with its compute, so a late start never waits on one.
                    assert not paces[peer].late(step, r)
                    assert paces[r].arrival[r][step] < paces[r].arrival[peer][step]
    # Forward step 1: rank 2 computes block 1 while rank 1, one block ahead, sends it block 0: rank 2
    # receives after its compute.
    assert _pace(busy, 2).late(1, 1)
    assert not _pace(busy, 1).late(1, 2)


def test_no_table_means_no_late_transfers() -> None:
    comm = SimpleNamespace(rank=0, next_rank=1, prev_rank=1)
    assert not Pace(None, comm, range(2)).late(0, 1)  # type: ignore[arg-type]
