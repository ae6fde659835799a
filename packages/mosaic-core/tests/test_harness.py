"""The multi-process harness: results, remote exceptions with tracebacks, timeouts."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from mosaic.testing import DistributedTestError, run_distributed


def _rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_two() -> None:
    if dist.get_rank() == 2:
        raise ValueError("boom on rank two")


def _hang_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        time.sleep(120)


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_world, 4) == [(r, 4) for r in range(4)]


def test_exception_on_one_rank_is_reported_with_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_two, 4)
    message = str(info.value)
    assert "failed on rank(s) [2]" in message
    assert "ValueError: boom on rank two" in message
    assert "_fail_on_rank_two" in message  # the traceback names the function
    assert run_distributed(_rank_and_world, 4)[2] == (2, 4)  # fresh workers afterwards


def test_hang_ends_with_a_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 3 s on rank\(s\) \[0\]"):
        run_distributed(_hang_on_rank_zero, 2, timeout=3)
    assert time.monotonic() - start < 30
    assert run_distributed(_rank_and_world, 2) == [(0, 2), (1, 2)]
