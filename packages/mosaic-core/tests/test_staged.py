"""The host-staged transport (``mosaic.comm.staged``), with which several ranks share one GPU over gloo.

On a CPU machine there is no CUDA tensor to stage, so staging is switched on for
every tensor: the host buffers, the receives landed into their targets after
the wait and the copies back run the path ``--one-gpu`` runs on a GPU, and every
standard case of the strategies that use each kind of transfer must still match
``local``: all-gather and reduce-scatter (allgather), P2P rings (ring), and
all-to-all (ulysses).
"""

from __future__ import annotations

import pytest

import mosaic
from mosaic import comm
from mosaic.testing import run_conformance


def stage_everything() -> None:
    comm.staged = lambda group, x: True


@pytest.mark.parametrize("backend", ["allgather", "ring", "ulysses"])
def test_staged_transfers_match_local(backend: str) -> None:
    if backend not in mosaic.available_backends():
        pytest.skip(f"{backend} is not installed")
    worlds = (2, 4) if backend == "ulysses" else (2, 3)  # the cases' heads split over 2 and 4 ranks
    run_conformance(backend, world_sizes=worlds, setup=stage_everything)
