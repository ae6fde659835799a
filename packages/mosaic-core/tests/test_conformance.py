"""The conformance kit on a third-party plugin: a backend written with Mosaic's public API only.

``gather_all`` gathers every rank's keys below ``kv_len`` with the
differentiable ``ctx.unshard`` and attends with ``mosaic.attention(backend=
"local")``. It declares no causal support, so the kit runs every standard case
but the causal ones. Wrong variants of it each break one thing: a case, or one
rule of the contract (:mod:`mosaic.testing.rules`).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import mosaic
from mosaic.testing import STANDARD_CASES, cases_for, run_conformance, run_distributed
from mosaic.testing.__main__ import main
from mosaic.testing.rules import RULES


@dataclass(frozen=True)
class GatherAllPlan(mosaic.Plan):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.problem
        mine = p.kv_block(p.rank)  # this rank's key rows below kv_len: the others never travel
        # Rank order, not position order: without causal masking the order of the keys doesn't matter.
        keys, values = (p.context.unshard(mine.take(t), 2) for t in (k, v))
        return mosaic.attention(q, keys, values, scale=p.scale)


@dataclass(frozen=True)
class Mesh2DLikeOptions(mosaic.Options):
    """An option without a default, as mesh2d's."""

    mesh_shape: tuple[int, int]


class GatherAll(mosaic.Backend):
    name = "gather_all"
    capabilities = mosaic.Capabilities(causal=False)

    def plan(self, problem: mosaic.AttentionProblem) -> mosaic.Plan:
        return GatherAllPlan(problem, mosaic.Cost())


def test_the_kit_filters_cases_by_declared_support() -> None:
    kept, skipped = cases_for("gather_all", 2)
    assert set(skipped) == {c.name for c in STANDARD_CASES if c.causal}
    assert all("causal=True not supported" in r[0] for r in skipped.values())
    assert len(kept) + len(skipped) == len(STANDARD_CASES)


def test_a_plugin_runs_the_kit_with_one_call() -> None:
    results = run_conformance("gather_all", world_sizes=(1, 2, 3), setup=register)
    assert all(len(r) == len(STANDARD_CASES) - sum(c.causal for c in STANDARD_CASES) for r in results.values())


def test_a_wrong_plugin_fails_the_kit() -> None:
    with pytest.raises(AssertionError, match="fails conformance"):
        run_conformance("local_keys_only", world_sizes=(2,), setup=register)


class LocalKeysOnly(GatherAll):
    """Wrong on purpose: attends to this rank's keys only."""

    name = "local_keys_only"

    def plan(self, problem):
        return _LocalKeysPlan(problem, mosaic.Cost())


@dataclass(frozen=True)
class _LocalKeysPlan(mosaic.Plan):
    def __call__(self, q, k, v):
        return mosaic.attention(q, k, v, scale=self.problem.scale)


@dataclass(frozen=True)
class _EveryRowPlan(mosaic.Plan):
    def __call__(self, q, k, v):
        p = self.problem
        keys, values = (p.context.unshard(t, 2, p.kv_layout.kind) for t in (k, v))
        return mosaic.attention(q, keys, values, kv_len=p.kv_len, scale=p.scale)


class SendsEveryRow(GatherAll):
    """Right answers, but the key rows past kv_len travel too."""

    name = "sends_every_row"

    def plan(self, problem):
        return _EveryRowPlan(problem, mosaic.Cost())


class CostsDifferPerRank(GatherAll):
    """Prices from this rank's own rows: ranks would rank strategies differently."""

    name = "costs_differ_per_rank"

    def estimate(self, problem):
        return mosaic.Cost(memory=float(problem.q_layout.lengths[problem.rank] + problem.rank))


class CommunicatesWhileEstimating(GatherAll):
    """Asks the group while pricing."""

    name = "communicates_while_estimating"

    def estimate(self, problem):
        torch.distributed.all_reduce(torch.zeros(1), group=problem.group)
        return mosaic.Cost()


@dataclass(frozen=True)
class _SwallowingPlan(GatherAllPlan):
    def __call__(self, q, k, v):
        try:
            return super().__call__(q, k, v)
        except RuntimeError:  # carries on with this rank's keys: silently wrong, and alone
            return mosaic.attention(q, k, v, scale=self.problem.scale)


class SwallowsFailures(GatherAll):
    """Hides a failed collective on the rank where it failed."""

    name = "swallows_failures"

    def plan(self, problem):
        return _SwallowingPlan(problem, mosaic.Cost())


def _plugins() -> tuple[type[mosaic.Backend], ...]:
    return (GatherAll, LocalKeysOnly, RaisesOnCross, NeedsShape, OneRankOnly, SendsEveryRow, CostsDifferPerRank,
            CommunicatesWhileEstimating, SwallowsFailures)  # fmt: skip


def register() -> None:
    """What the plugin's package would do through its entry point; run on every rank."""
    for cls in _plugins():
        mosaic.register_backend(cls.name, cls, override=True)


def unregister() -> None:
    for cls in _plugins():
        mosaic.unregister_backend(cls.name)


@pytest.fixture(autouse=True)
def plugins():
    """Registered here and in the worker processes only while a test runs (``auto`` would rank them)."""
    register()
    yield
    unregister()
    for world in (1, 2, 3):
        run_distributed(unregister, world)


class RaisesOnCross(GatherAll):
    """Raises, on every rank, for cross-attention: the kit must report it, not stop."""

    name = "raises_on_cross"

    def plan(self, problem):
        if problem.cross:
            raise RuntimeError("no cross-attention here")
        return super().plan(problem)


def test_the_report_has_a_verdict_a_row_per_case_and_prints_a_table(capsys) -> None:
    report = run_conformance("gather_all", world_sizes=(2,), setup=register)
    assert report.passed and report.backend == "gather_all" and report.world_sizes == (2,)
    status = {r.case: r.status for r in report.results}
    rules = {f"rule: {rule}": "pass" for rule in RULES}
    assert status == {**{c.name: "skip" if c.causal else "pass" for c in STANDARD_CASES}, **rules}
    skipped = [r for r in report.results if r.status == "skip"]
    assert all(r.reasons == ("causal=True not supported",) and not r.errors for r in skipped)
    passed = [r for r in report.results if r.status == "pass" and r.case not in rules]
    assert all(set(r.errors) >= {"out", "dx", "params"} and max(r.errors.values()) <= 1e-5 for r in passed)
    # As a mapping: the errors of the cases that ran, as run_conformance returned before.
    assert set(report) == {2} and set(report[2]) == {r.case for r in passed}
    table = capsys.readouterr().out
    assert table.strip() == report.table() and "PASSED" in table.splitlines()[0]
    assert "skipped P=2 causal: causal=True not supported" in table


def test_a_failing_backend_gets_a_failing_report_with_check_false() -> None:
    report = run_conformance("local_keys_only", world_sizes=(2,), setup=register, check=False, print_table=False)
    assert not report.passed
    failed = [r for r in report.results if r.status == "fail" and not r.case.startswith("rule: ")]
    assert failed and all(" error " in r.reasons[0] and r.reasons[0].endswith("> 1e-05") for r in failed)
    table = report.table()
    assert "FAILED" in table.splitlines()[0] and f"FAILED P=2 {failed[0].case}: " in table
    with pytest.raises(AssertionError, match="fails conformance"):
        report.check()


def test_a_case_that_raises_fails_and_the_rest_of_its_world_size_is_skipped() -> None:
    report = run_conformance("raises_on_cross", world_sizes=(2,), setup=register, check=False, print_table=False)
    by_case = {r.case: r for r in report.results}
    assert by_case["cross-attention"].status == "fail"
    assert "raised RuntimeError: no cross-attention here" in by_case["cross-attention"].reasons[0]
    later = by_case["cross-attention with kv_len"]
    assert later.status == "skip" and later.reasons == ("not run: case 'cross-attention' raised before it",)
    assert by_case["dim 1 of 4-D"].status == "pass" and not report.passed


class OneRankOnly(GatherAll):
    name = "one_rank_only"
    capabilities = mosaic.Capabilities(causal=False, max_group_size=1)


def test_a_world_size_without_any_declared_case_fails() -> None:
    report = run_conformance("one_rank_only", world_sizes=(2,), setup=register, check=False, print_table=False)
    assert not report.passed and report.problems == ("P=2: the backend declares none of the 17 cases",)
    assert {r.status for r in report.results} == {"skip"}


class NeedsShape(GatherAll):
    name = "needs_shape"
    Options = Mesh2DLikeOptions


def test_command_line_exit_status_and_table(capsys) -> None:
    """``local`` passes on one rank and, given a sharded dim, raises on two."""
    assert main(["local", "--world-sizes", "1", "2"]) == 1
    out = capsys.readouterr().out
    # P=1: 17 cases and 3 rules pass (the fourth needs a peer); P=2: the first case raises, the rest skip.
    assert out.startswith("conformance of backend 'local' (tolerance 1e-05): FAILED, 20 passed, 1 failed, 17 skipped")
    assert "FAILED P=2 dim 1 of 4-D: raised " in out


def test_command_line_names_a_missing_option_with_an_example(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["needs_shape", "--world-sizes", "4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m mosaic.testing: error: backend 'needs_shape' needs option(s) mesh_shape: "
        "e.g. --option mesh_shape=2,2"
    )


def test_python_dash_m_runs_the_kit() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mosaic.testing", "local", "--world-sizes", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "conformance of backend 'local' (tolerance 1e-05): PASSED" in done.stdout


@pytest.mark.parametrize(
    "backend, rule",
    [
        ("sends_every_row", RULES[2]),
        ("costs_differ_per_rank", RULES[0]),
        ("communicates_while_estimating", RULES[1]),
        ("swallows_failures", RULES[3]),
    ],
)
def test_a_plugin_that_breaks_a_rule_fails_that_rule_only(backend: str, rule: str) -> None:
    report = run_conformance(backend, world_sizes=(2,), setup=register, check=False, print_table=False)
    failed = {r.case for r in report.results if r.status == "fail"}
    assert failed == {f"rule: {rule}"}, report.table()
    assert not report.passed and f"P=2 rule: {rule}: " in "\n".join(report.failures())
