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
(:func:`~mosaic.testing.compare_with_local`); then the contract's rules run
(:mod:`mosaic.testing.rules`), a row each in the table. The call prints a pass/fail
table, raises when the backend fails (``check=False`` returns instead) and
returns a :class:`ConformanceReport` with the verdict and every case's
result. From the shell: ``python -m mosaic.testing NAME`` (see
:mod:`mosaic.testing.__main__`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..layout import SeqLayout
from .harness import DistributedTestError, run_distributed
from .reference import compare_with_local

__all__ = ["STANDARD_CASES", "Case", "CaseResult", "ConformanceReport", "cases_for", "run_conformance", "with_extra"]

KvLen = int | Callable[[int, int], int] | None
RULE_PREFIX = "rule: "  # the table's rows of the contract's rules


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


Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class CaseResult:
    """One case at one world size: ``"pass"``, ``"fail"`` or ``"skip"``, why, and the errors measured.

    ``reasons`` say why a case was skipped (what the backend declares it can't
    run, or that an earlier case raised first) or why it failed (the errors over
    the tolerance, or what it raised); ``errors`` are those of
    :func:`~mosaic.testing.compare_with_local` (empty when nothing was measured).
    """

    world_size: int
    case: str
    status: Status
    reasons: tuple[str, ...] = ()
    errors: Mapping[str, float] = field(default_factory=dict)

    def cell(self) -> str:
        """The table's entry: the status and, for a measured case, its largest error."""
        label = {"pass": "pass", "fail": "FAIL", "skip": "skip"}[self.status]
        if not self.errors:
            return label
        return f"{label} {max(self.errors.values()):.1e}"


@dataclass(frozen=True)
class ConformanceReport(Mapping[int, dict[str, dict[str, float]]]):
    """What :func:`run_conformance` found: a verdict, a row per case and world size, a printable table.

    As a mapping it is ``{world size: {case name: errors}}`` over the cases
    that ran (what ``run_conformance`` returned before it had a report); the
    rules' rows (``"rule: ..."``) are in :attr:`results` only.

    Attributes:
        backend: the backend checked.
        tolerance: the largest error a passing case may have.
        world_sizes: the world sizes asked for, in order.
        results: every case at every world size (see :class:`CaseResult`).
        problems: failures of a whole world size (no case declared, or the run failed).
    """

    backend: str
    tolerance: float
    world_sizes: tuple[int, ...]
    results: tuple[CaseResult, ...]
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """No case failed and every world size ran at least one case."""
        return not self.problems and all(r.status != "fail" for r in self.results)

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    def failures(self) -> list[str]:
        """One line per failure: the world-size problems, then every failed case with its reasons."""
        lines = list(self.problems)
        lines += [f"P={r.world_size} {r.case}: {'; '.join(r.reasons)}" for r in self.results if r.status == "fail"]
        return lines

    def check(self) -> None:
        """Raise ``AssertionError`` listing every failure unless the backend passed."""
        if not self.passed:
            raise AssertionError(f"backend {self.backend!r} fails conformance:\n  " + "\n  ".join(self.failures()))

    def table(self) -> str:
        """A pass/fail/skip table, a case per row and a world size per column, with the reasons below."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"conformance of backend {self.backend!r} (tolerance {self.tolerance:g}): {verdict}, "
            f"{self.count('pass')} passed, {self.count('fail')} failed, {self.count('skip')} skipped"
        ]
        cells = {(r.case, r.world_size): r.cell() for r in self.results}
        names = list(dict.fromkeys(r.case for r in self.results))
        width = max([len("case"), *map(len, names)])
        columns = [f"P={w}" for w in self.world_sizes]
        size = max([len(c) for c in columns] + [len(c) for c in cells.values()])
        lines.append("  ".join([f"{'case':<{width}}", *(f"{c:<{size}}" for c in columns)]).rstrip())
        for name in names:
            row = [cells.get((name, w), "-") for w in self.world_sizes]
            lines.append("  ".join([f"{name:<{width}}", *(f"{c:<{size}}" for c in row)]).rstrip())
        lines += [f"FAILED {line}" for line in self.failures()]
        skips = [r for r in self.results if r.status == "skip"]
        lines += [f"skipped P={r.world_size} {r.case}: {'; '.join(r.reasons)}" for r in skips]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _measured(self) -> dict[int, dict[str, dict[str, float]]]:
        ran: dict[int, dict[str, dict[str, float]]] = {}
        for r in self.results:
            if r.status != "skip" and not r.case.startswith(RULE_PREFIX):
                ran.setdefault(r.world_size, {})[r.case] = dict(r.errors)
        return ran

    def __getitem__(self, world_size: int) -> dict[str, dict[str, float]]:
        return self._measured()[world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._measured())

    def __len__(self) -> int:
        return len(self._measured())


def _run_cases(
    backend: str, world_size: int, options, cases: list[Case], dtype, setup: Callable[[], None] | None, rules: bool
):
    """On every rank: the cases in order, up to the first that raises (after it the ranks may be out of step);
    then, when every case ran, the contract's rules (:mod:`mosaic.testing.rules`)."""
    import mosaic

    if setup is not None:
        setup()
    ctx = mosaic.init(sp_size=world_size)
    results: dict[str, dict[str, float]] = {}
    with _posed(mosaic.get_backend(backend)) as problems:
        for case in cases:
            kwargs: dict[str, Any] = dict(
                num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, kv_length=case.kv_length,
                kv_len=case.kv_len_for(world_size), causal=case.causal, layout=case.layout, dtype=dtype,
                backend_options=dict(options or {}), **case.extra,
            )  # fmt: skip
            try:
                results[case.name] = compare_with_local(backend, case.shape, case.axis, **kwargs)
            except Exception as exc:
                return results, (case.name, f"raised {type(exc).__name__}: {exc}"), {}
    return results, None, _check_rules(backend, options, problems, ctx) if rules else {}


@contextlib.contextmanager
def _posed(backend) -> Iterator[list]:
    """The problems the cases pose to ``backend`` (each planned once: plans are cached by problem)."""
    problems: list = []
    plan = backend.plan

    def recording(problem):
        problems.append(problem)
        return plan(problem)

    backend.plan = recording
    try:
        yield problems
    finally:
        del backend.plan  # the class's method again


# How long a rank waits for a peer in the injected-failure rule: the others learn of it by this timeout.
_RULE_TIMEOUT = 3.0


def _check_rules(backend: str, options, problems: list, ctx) -> dict[str, Any]:
    """Every rule's outcome on this rank: ``None`` (kept), a failure, ``("skip", why)``, or for the injected
    failure what this rank raised (compared across ranks by the caller)."""
    import mosaic

    from . import rules

    chosen = mosaic.get_backend(backend)
    outcome: dict[str, Any] = rules.check_estimates(chosen, problems, ctx)
    try:
        outcome[rules.RULES[2]] = rules.check_kv_len_rows(backend, options, ctx)
    except mosaic.BackendNotSupported as exc:
        outcome[rules.RULES[2]] = ("skip", _first_line(exc))
    if ctx.sp_size == 1:
        outcome[rules.RULES[3]] = ("skip", "one rank: no peer to fail with")
        return outcome
    mosaic.shutdown()
    ctx = mosaic.init(sp_size=ctx.sp_size, collective_timeout=_RULE_TIMEOUT)
    kind, text = rules.check_injected_error(backend, options, ctx)
    outcome[rules.RULES[3]] = ("skip", text) if kind == "skip" else ("raised", kind, text)
    return outcome


def _rule_results(world: int, outcome: list) -> list[CaseResult]:
    """A row per rule at one world size, from every rank's outcome."""
    from .rules import RULES

    found = [rules for _, stop, rules in outcome if stop is None]
    if len(found) != len(outcome) or not found[0]:
        return []
    results = []
    for rule in RULES:
        views = [ranks[rule] for ranks in found]
        name = f"{RULE_PREFIX}{rule}"
        if isinstance(views[0], tuple) and views[0][0] == "skip":
            results.append(CaseResult(world, name, "skip", (views[0][1],)))
        elif isinstance(views[0], tuple):  # what each rank raised after the injected failure
            raised = [f"{kind}: {text}" if kind else "nothing" for _, kind, text in views]
            same = len(set(raised)) == 1 and raised[0] != "nothing" and "injected failure" in raised[0]
            why = () if same else tuple(f"rank {r} raised {text[:200]}" for r, text in enumerate(raised))
            results.append(CaseResult(world, name, "pass" if same else "fail", why))
        else:
            failures = sorted({f"rank {r}: {v}" for r, v in enumerate(views) if v})
            results.append(CaseResult(world, name, "fail" if failures else "pass", tuple(failures)))
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _run_failure(exc: BaseException) -> str:
    """What stopped a run: the first rank's own error where the harness reports one, not only its header."""
    lines = str(exc).strip().splitlines()
    if isinstance(exc, DistributedTestError) and len(lines) > 2 and lines[1].startswith("--- rank"):
        return f"{lines[0]} {lines[1]} {lines[2]}"
    return _first_line(exc)


def _results_at(
    world: int,
    cases: Sequence[Case],
    skipped: Mapping[str, list[str]],
    outcome: list[tuple[dict[str, dict[str, float]], tuple[str, str] | None, dict[str, Any]]] | Exception,
    tolerance: float,
) -> list[CaseResult]:
    """Every case's result at one world size, in the order of ``cases``, from what each rank returned."""
    results: list[CaseResult] = []
    if isinstance(outcome, Exception):
        # A rank died or hung: no case of this size can be trusted.
        why = (f"the run at P={world} failed: {_run_failure(outcome)}",)
    else:
        # Every rank computes the same errors (from gathered tensors); a case that raised anywhere failed.
        raised = dict(stop for _, stop, _ in outcome if stop is not None)
        ran = set.intersection(*(set(measured) for measured, _, _ in outcome))
        measured = outcome[0][0]
    for case in cases:
        name = case.name
        if name in skipped:
            results.append(CaseResult(world, name, "skip", tuple(skipped[name])))
        elif isinstance(outcome, Exception):
            results.append(CaseResult(world, name, "fail", why))
        elif name in raised:
            results.append(CaseResult(world, name, "fail", (raised[name],)))
        elif name in ran:
            errors = measured[name]
            reasons = tuple(f"{k} error {v:.2e} > {tolerance:g}" for k, v in errors.items() if not v <= tolerance)
            results.append(CaseResult(world, name, "fail" if reasons else "pass", reasons, errors))
        else:
            first = next(iter(raised))
            results.append(CaseResult(world, name, "skip", (f"not run: case {first!r} raised before it",)))
    if not isinstance(outcome, Exception):
        results += _rule_results(world, outcome)
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
    check: bool = True,
    print_table: bool = True,
    rules: bool = True,
) -> ConformanceReport:
    """Check ``backend`` on every case it declares it runs, at each world size, against ``local``.

    A case whose error exceeds ``tolerance`` anywhere fails, and so does one that
    raises (the cases after it at that world size are skipped: the ranks may be out
    of step); a world size at which the backend declares no case at all fails as a
    whole. ``setup`` (a module-level function) runs on every rank first, e.g. to
    register a backend that no entry point provides.

    Args:
        backend: the backend's registered name.
        world_sizes: the gloo world sizes to run (each a group of that many processes).
        options: the backend's options, as ``MultiAxisAttention(backend_options=...)`` takes them.
        cases: the cases to try (default :data:`STANDARD_CASES`).
        tolerance: the largest error of a passing case (fp32: ``1e-5``).
        dtype: the dtype of the inputs and the module.
        timeout: seconds one world size may take before its workers are killed.
        setup: run on every rank before the cases.
        check: raise ``AssertionError`` listing the failures when the backend fails
            (:meth:`ConformanceReport.check`); ``False`` returns the failing report.
        print_table: print the pass/fail table (:meth:`ConformanceReport.table`).
        rules: also check the contract's rules (:mod:`mosaic.testing.rules`: equal cost on every
            rank, no collective while estimating, no key row past ``kv_len`` sent, the same error on
            every rank for a collective that fails on one), once every case at a world size ran.

    Returns:
        The :class:`ConformanceReport`: ``report.passed``, a :class:`CaseResult` per
        case and world size, and ``report[world_size][case name]`` for the errors.
    """
    results: list[CaseResult] = []
    problems: list[str] = []
    for world in world_sizes:
        kept, skipped = cases_for(backend, world, options, cases)
        if not kept:
            problems.append(f"P={world}: the backend declares none of the {len(cases)} cases")
            results += _results_at(world, cases, skipped, [({}, None, {})], tolerance)
            continue
        try:
            outcome = run_distributed(_run_cases, world, backend, world, options, kept, dtype, setup, rules,
                                      timeout=timeout)  # fmt: skip
        except (DistributedTestError, TimeoutError) as exc:
            outcome = exc
        results += _results_at(world, cases, skipped, outcome, tolerance)
    report = ConformanceReport(backend, tolerance, tuple(world_sizes), tuple(results), tuple(problems))
    if print_table:
        print(report.table(), flush=True)
    if check:
        report.check()
    return report


def with_extra(case: Case, **extra: Any) -> Case:
    """``case`` with more keyword arguments for :func:`~mosaic.testing.compare_with_local`."""
    return dataclasses.replace(case, extra={**case.extra, **extra})
