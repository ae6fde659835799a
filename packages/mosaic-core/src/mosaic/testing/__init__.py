"""Testing Mosaic and its plugins: a multi-process gloo harness, references, and the conformance kit.

- :func:`run_distributed` runs a function on N reusable gloo processes (:mod:`.harness`);
- :func:`compare_with_local`, :func:`mha_reference`, :func:`make_problem` (:mod:`.reference`);
- :func:`run_conformance` checks any backend on the standard cases it declares (:mod:`.conformance`).
"""

from __future__ import annotations

from .conformance import STANDARD_CASES, Case, cases_for, run_conformance, with_extra
from .harness import DistributedTestError, ProcessPool, close_pools, run_distributed
from .reference import (
    compare_with_local,
    local_reference,
    make_problem,
    max_error,
    mha_reference,
    reference_attention,
)

__all__ = [
    "STANDARD_CASES",
    "Case",
    "DistributedTestError",
    "ProcessPool",
    "cases_for",
    "close_pools",
    "compare_with_local",
    "local_reference",
    "make_problem",
    "max_error",
    "mha_reference",
    "reference_attention",
    "run_conformance",
    "run_distributed",
    "with_extra",
]
