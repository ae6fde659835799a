"""Testing Mosaic and its plugins: a multi-process gloo harness, references, and the conformance kit.

- :func:`run_distributed` runs a function on N reusable gloo processes (:mod:`.harness`);
- :func:`compare_with_local`, :func:`mha_reference`, :func:`make_problem` (:mod:`.reference`);
- :func:`run_conformance` checks any backend on the standard cases it declares and returns a
  :class:`ConformanceReport` (:mod:`.conformance`); ``python -m mosaic.testing NAME`` runs it from the shell.
"""

from __future__ import annotations

from .conformance import (
    STANDARD_CASES,
    Case,
    CaseResult,
    ConformanceReport,
    cases_for,
    run_conformance,
    with_extra,
)
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
    "CaseResult",
    "ConformanceReport",
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
