"""What a new user of #27 tried whose fix lies in mosaic-core's internals, as README and docs describe it.

Each test asks for the behaviour the issue wants; each failed on the code of
aac2f66.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
import torch

import mosaic
from mosaic.testing import run_distributed


@pytest.fixture
def one_process():
    ctx = mosaic.init()
    yield ctx
    mosaic.shutdown()


def test_collective_timeout_takes_seconds() -> None:
    """README: ``mosaic.init(..., collective_timeout=60)``, in seconds or as a timedelta."""
    try:
        ctx = mosaic.init(collective_timeout=20)
        assert ctx.collective_timeout == timedelta(seconds=20)
    finally:
        mosaic.shutdown()
    try:
        assert mosaic.init(collective_timeout=timedelta(seconds=3)).collective_timeout == timedelta(seconds=3)
    finally:
        mosaic.shutdown()


def fewer_positions_than_ranks() -> tuple[tuple, int]:
    ctx = mosaic.init(sp_size=2)
    shard = ctx.sharded_dim(1, dim=1)
    return shard.spans, shard.length


def test_sharded_dim_over_fewer_positions_than_ranks() -> None:
    """Empty shards are supported elsewhere (the conformance kit's 'fewer rows than ranks')."""
    assert run_distributed(fewer_positions_than_ranks, 2) == [(((0, 1),), 1), ((), 0)]


def test_multiaxisattention_called_like_nn_multiheadattention_names_the_right_call(one_process) -> None:
    attn = mosaic.MultiAxisAttention(16, 4, 1)
    x = torch.randn(2, 5, 16)
    with pytest.raises((TypeError, ValueError)) as raised:
        attn(x, x, x)
    message = str(raised.value)
    assert "positional argument" not in message and "kv" in message, message


def test_mosaic_multiheadattention_with_two_inputs_names_the_right_call(one_process) -> None:
    attn = mosaic.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises((TypeError, ValueError)) as raised:
        attn(x, x)[0]
    message = str(raised.value)
    assert "positional argument" not in message and "value" in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the listing without CUDA")
def test_available_backends_leave_out_cuda_only_engines_without_cuda() -> None:
    assert not {"magi", "ring_flash_attn"} & set(mosaic.available_backends())


def test_python_dash_m_mosaic_prints_the_doctor_table() -> None:
    done = subprocess.run([sys.executable, "-m", "mosaic"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.__version__ in done.stdout
    for name in mosaic.available_backends():
        assert name in done.stdout, name
