"""The conformance kit: the standard cases every backend must match ``local`` on.

:data:`STANDARD_CASES` covers the attention dim's position (dims 1, 2, -2,
3-D and 5-D tensors), uneven and empty shards, ``kv_len`` inside a shard, at
a shard edge and at 1, causal attention (contiguous and zigzag), grouped and
single kv heads, fewer heads than ranks, and cross-attention. Each case is
kept for a backend and a group size only when the backend declares it can run
it (``Backend.not_supported_reasons`` on the case's problem), so a strategy
with limits runs every case it claims. One call checks a backend, in-tree or
third-party::

    from mosaic.testing import run_conformance
    run_conformance("mine", world_sizes=(1, 2, 3, 4), options={...})

Every case compares outputs, input (and kv) gradients and parameter
gradients with the ``local`` backend on the unsharded tensor
(:func:`~mosaic.testing.compare_with_local`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layout import SeqLayout
from .harness import run_distributed
from .reference import compare_with_local

__all__ = ["STANDARD_CASES", "Case", "cases_for", "run_conformance"]

KvLen = int | Callable[[int, int], int] | None


@dataclass(frozen=True)
class Case:
    """One check: a tensor shape, the dim attended over, and the call's settings.

    ``kv_len`` may be a function of ``(length, world_size)`` (e.g. a shard edge).
    """

    name: str
    shape: tuple[int, ...]
    axis: int
    kv_len: KvLen = None
    causal: bool = False
    layout: str = "contiguous"
    num_heads: int = 4
    num_kv_heads: int | None = None
    kv_length: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def length(self) -> int:
        return self.shape[self.axis]

    def kv_len_for(self, world_size: int) -> int | None:
        if callable(self.kv_len):
            return self.kv_len(self.kv_length or self.length(), world_size)
        return self.kv_len


def _first_shard_end(length: int, world_size: int) -> int:
    return SeqLayout.even(length, world_size).lengths[0]


STANDARD_CASES: tuple[Case, ...] = (
    Case("dim 1 of 4-D", (2, 13, 3, 16), 1),
    Case("dim 2 of 4-D", (2, 3, 11, 16), 2),
    Case("dim -2 of 4-D", (2, 3, 10, 16), -2),
    Case("3-D", (3, 9, 16), 1),
    Case("5-D", (2, 2, 7, 3, 16), 2),
    Case("fewer rows than ranks (empty shards)", (2, 3, 2, 16), 1),
    Case("kv_len inside a shard", (2, 13, 3, 16), 1, kv_len=5),
    Case("kv_len at a shard edge", (2, 13, 3, 16), 1, kv_len=_first_shard_end),
    Case("kv_len = 1", (2, 9, 2, 16), 1, kv_len=1),
    Case("causal", (2, 12, 2, 16), 1, causal=True),
    Case("causal, zigzag", (2, 16, 2, 16), 1, causal=True, layout="zigzag"),
    Case("causal with kv_len", (2, 14, 2, 16), 1, causal=True, kv_len=9),
    Case("grouped kv heads", (2, 10, 3, 16), 1, num_kv_heads=2, kv_len=7),
    Case("one kv head", (2, 10, 2, 16), 1, num_kv_heads=1),
    Case("fewer heads than ranks", (2, 10, 2, 16), 1, num_heads=2),
    Case("cross-attention", (2, 8, 3, 16), 1, kv_length=11),
    Case("cross-attention with kv_len", (2, 8, 3, 16), 1, kv_length=11, kv_len=6),
)


def _problem_of(case: Case, backend: str, world_size: int, options: Mapping[str, Any] | None):
    from .reference import make_problem

    length = case.length()
    kv_length = case.kv_length or length
    heads = case.num_heads
    kv_heads = case.num_kv_heads or heads
    head_dim = case.shape[-1] // heads
    q_layout = SeqLayout.even(length, world_size, case.layout)
    kv_layout = SeqLayout.even(kv_length, world_size, case.layout)
    batch = 1
    for i, n in enumerate(case.shape[:-1]):
        if i != case.axis % len(case.shape):
            batch *= n
    return make_problem(
        size=world_size, heads=heads, kv_heads=kv_heads, length=length, head_dim=head_dim, backend=backend,
        options=options, batch=batch, q_layout=q_layout, kv_layout=kv_layout, causal=case.causal,
        kv_len=case.kv_len_for(world_size), cross=case.kv_length is not None,
    )  # fmt: skip


def cases_for(
    backend: str,
    world_size: int,
    options: Mapping[str, Any] | None = None,
    cases: Sequence[Case] = STANDARD_CASES,
) -> tuple[list[Case], dict[str, list[str]]]:
    """The cases ``backend`` declares it can run on ``world_size`` ranks, and the others with its reasons."""
    import mosaic

    chosen = mosaic.get_backend(backend)
    kept, skipped = [], {}
    for case in cases:
        try:
            reasons = chosen.not_supported_reasons(_problem_of(case, backend, world_size, options))
        except ValueError as exc:  # a layout the case can't have at this size (zigzag needs 2P chunks)
            reasons = [str(exc)]
        if reasons:
            skipped[case.name] = reasons
        else:
            kept.append(case)
    return kept, skipped


def _run_cases(backend: str, world_size: int, options, cases: list[Case], dtype, setup: Callable[[], None] | None):
    import mosaic

    if setup is not None:
        setup()
    mosaic.init(sp_size=world_size)
    results = {}
    for case in cases:
        kwargs: dict[str, Any] = dict(
            num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, kv_length=case.kv_length,
            kv_len=case.kv_len_for(world_size), causal=case.causal, layout=case.layout, dtype=dtype,
            backend_options=dict(options or {}), **case.extra,
        )  # fmt: skip
        results[case.name] = compare_with_local(backend, case.shape, case.axis, **kwargs)
    return results


def run_conformance(
    backend: str,
    world_sizes: Sequence[int] = (1, 2, 3, 4),
    *,
    options: Mapping[str, Any] | None = None,
    cases: Sequence[Case] = STANDARD_CASES,
    tolerance: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    timeout: float = 300.0,
    setup: Callable[[], None] | None = None,
) -> dict[int, dict[str, dict[str, float]]]:
    """Check ``backend`` on every case it declares it runs, at each world size; raise listing failures.

    Returns ``{world_size: {case name: errors}}`` (errors as
    :func:`~mosaic.testing.compare_with_local` reports them). A case whose error
    exceeds ``tolerance`` anywhere fails; so does a world size at which the
    backend declares no case at all. ``setup`` (a module-level function) runs on
    every rank first, e.g. to register a backend that no entry point provides.
    """
    found: dict[int, dict[str, dict[str, float]]] = {}
    failures = []
    for world in world_sizes:
        kept, _ = cases_for(backend, world, options, cases)
        if not kept:
            failures.append(f"P={world}: the backend declares none of the {len(cases)} cases")
            continue
        results = run_distributed(_run_cases, world, backend, world, options, kept, dtype, setup, timeout=timeout)
        # Every rank holds the same errors (they are computed from gathered tensors); keep rank 0's.
        found[world] = results[0]
        for name, errors in results[0].items():
            bad = {k: v for k, v in errors.items() if not v <= tolerance}
            if bad:
                failures.append(f"P={world} {name}: {bad}")
    if failures:
        raise AssertionError(f"backend {backend!r} fails conformance:\n  " + "\n  ".join(failures))
    return found


def with_extra(case: Case, **extra: Any) -> Case:
    """``case`` with more keyword arguments for :func:`~mosaic.testing.compare_with_local`."""
    return dataclasses.replace(case, extra={**case.extra, **extra})
