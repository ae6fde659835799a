"""``backend="auto"`` and ``mosaic.explain``: rank every installed strategy by its estimated cost.

For a problem, every installed backend is asked (in the manner of xformers'
dispatch walk) for the option sets worth trying (``Backend.candidate_options``:
the defaults, every mesh shape of the group, ...); each one that accepts the
problem is priced (``Backend.estimate``: pure, no group made, no collective)
and :meth:`mosaic.cost.Machine.seconds` turns its cost into an estimate — its
forward alone when no backward will run. The cheapest whose memory fits the
budget is planned and runs. Every rank ranks alike: the backends installed
and the machine's rates are part of what the ranks agree on before a plan is
made (:meth:`AutoBackend.agreement_digest`), so ranks that would choose
differently raise together instead. :func:`explain` returns (and prints) the
whole ranking, with every rejected backend's reasons and the kernels of the
chosen plan.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .backend import Backend, Capabilities, Plan
from .context import get_context, is_initialized
from .cost import Cost, Machine, default_machine
from .errors import BackendNotSupported, BackendUnavailable
from .functional import agreed_problem
from .kernels import ranking
from .options import Options
from .plans import plan_inner
from .problem import AttentionProblem, kv_len_int
from .registry import get_backend, installed_backends

__all__ = ["AutoBackend", "AutoOptions", "Candidate", "Explanation", "explain", "rank"]


@dataclass(frozen=True)
class AutoOptions(Options):
    """Options of ``backend="auto"``.

    Args:
        candidates: backend names to choose from (default: every installed one).
        memory_budget: bytes a plan may hold beyond q, k, v and the output
            (default: the machine's, see :mod:`mosaic.cost`).
    """

    candidates: tuple[str, ...] | None = None
    memory_budget: float | None = None

    def __post_init__(self) -> None:
        if self.candidates is not None:
            if isinstance(self.candidates, str) or not all(isinstance(c, str) for c in self.candidates):
                raise ValueError(f"option candidates must be backend names, got {self.candidates!r}")
            object.__setattr__(self, "candidates", tuple(self.candidates))
            if "auto" in self.candidates:
                raise ValueError("option candidates can't include 'auto' itself")


@dataclass(frozen=True)
class Candidate:
    """One backend with one option set: its estimate, or why it can't run."""

    backend: str
    options: Options | None
    seconds: float | None = None
    cost: Cost | None = None
    reasons: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.reasons


@dataclass(frozen=True)
class Explanation:
    """The ranking ``auto`` made for one problem: accepted candidates fastest first, then the rejected.

    ``plan`` is the chosen candidate's plan when :func:`explain` built it (to show its kernels).
    """

    problem: AttentionProblem
    machine: Machine
    candidates: tuple[Candidate, ...]
    plan: Plan | None = None

    @property
    def chosen(self) -> Candidate | None:
        accepted = [c for c in self.candidates if c.accepted]
        return accepted[0] if accepted else None

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)

    def __str__(self) -> str:
        p = self.problem
        mode = "forward + backward" if p.backward else "forward only (no backward runs)"
        lines = [
            f"attention of batch' {p.batch}, {p.heads} heads ({p.kv_heads} kv), head dim {p.head_dim}, "
            f"{p.q_layout.total} queries x {p.kv_layout.total} keys over {p.size} ranks"
            f"{f', kv_len {p.kv_len}' if p.kv_len is not None else ''}{', causal' if p.causal else ''}, {p.dtype}, "
            f"ranked by {mode}",
            f"{'backend':<16}{'options':<62}{'estimate':>12}{'GiB/rank':>10}{'MiB recv':>10}",
        ]
        for c in self.candidates:
            opts = "" if c.options is None else str(c.options)
            if c.accepted:
                mark = "  <- chosen" if c is self.chosen else ""
                lines.append(
                    f"{c.backend:<16}{opts[:61]:<62}{c.seconds * 1e3:>10.3f}ms{c.cost.memory / 2**30:>10.3f}"
                    f"{c.cost.bytes / 2**20:>10.1f}{mark}"
                )
        for c in self.candidates:
            if not c.accepted:
                lines.append(f"{c.backend:<16}{((c.options and str(c.options)) or '')[:61]:<62}  rejected:")
                lines += [f"{'':<18}- {r}" for r in c.reasons]
        if self.plan is not None:
            lines += _kernel_lines(self.plan)
        return "\n".join(lines)


def rank(problem: AttentionProblem, options: AutoOptions | None = None) -> Explanation:
    """Every candidate for ``problem``, accepted ones cheapest first (ties by name), then the rejected.

    Pure: candidates are priced by :meth:`Backend.estimate`, nothing is planned, no collective runs.
    """
    options = options or AutoOptions()
    machine = _machine(problem, options)
    names = options.candidates or tuple(n for n in installed_backends() if n != "auto")
    found: list[Candidate] = []
    for name in names:
        try:
            backend = get_backend(name)
        except BackendUnavailable as exc:
            found.append(Candidate(name, None, reasons=(str(exc),)))
            continue
        if problem.size > 1 and not backend.capabilities.distributed:
            found.append(Candidate(name, None, reasons=("attends within one rank; the dim is sharded",)))
            continue
        tries = backend.candidate_options(problem)
        if not tries:
            found.append(Candidate(name, None, reasons=("has no option set to try without explicit options",)))
        for opts in tries:
            found.append(_candidate(backend, dataclasses.replace(problem, options=opts), machine))
    accepted = sorted((c for c in found if c.accepted), key=lambda c: (c.seconds, c.backend, str(c.options)))
    return Explanation(problem, machine, tuple(accepted + [c for c in found if not c.accepted]))


def _machine(problem: AttentionProblem, options: AutoOptions) -> Machine:
    machine = default_machine(problem.device)
    if options.memory_budget is not None:
        machine = dataclasses.replace(machine, memory_budget=options.memory_budget)
    return machine


def _candidate(backend: Backend, problem: AttentionProblem, machine: Machine) -> Candidate:
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        return Candidate(backend.name, problem.options, reasons=tuple(reasons))
    cost = backend.estimate(problem)
    if not machine.fits(cost):
        why = f"needs {cost.memory / 2**30:.2f} GiB per rank, over the budget of {machine.memory_budget / 2**30:.2f}"
        return Candidate(backend.name, problem.options, cost=cost, reasons=(why,))
    return Candidate(backend.name, problem.options, machine.seconds(cost, backward=problem.backward), cost)


def _kernel_lines(plan: Plan) -> list[str]:
    """The chosen plan's kernels, and why its largest block runs on its kernel and not on the others."""
    pieces = plan.block_pieces()
    if not pieces:
        return []
    largest = max(pieces, key=lambda p: p.q_len * p.k_len)
    spec = plan.problem.block_spec(largest.q_len, largest.k_len, largest.causal)
    lines = [f"the chosen plan runs its blocks on: {', '.join(plan.kernels())}",
             f"kernels for its largest block ({spec.q_len} x {spec.k_len} rows):"]  # fmt: skip
    return lines + [f"  {name:<12}{verdict}" for name, verdict in ranking(spec, largest.kernel)]


class AutoBackend(Backend):
    """The cheapest installed strategy for each problem, by its estimated cost (``mosaic.explain`` shows why)."""

    name = "auto"
    capabilities = Capabilities()
    Options = AutoOptions

    def agreement_digest(self, options: Options) -> int:
        """Options, the backends that could be candidates and the machine's rates: what decides the ranking."""
        names = options.candidates or tuple(n for n in installed_backends() if n != "auto")
        machines = [default_machine(torch.device(kind)) for kind in ("cpu", "cuda")]
        return zlib.crc32(repr((options.digest(), names, machines)).encode())

    def digest_differs(self, group: str) -> str:
        return (
            f"backend='auto' would choose differently on the ranks of the {group} group: the backends installed "
            "or the machine model (mosaic.calibrate, mosaic.cost.set_machine) differ between ranks; install the same "
            "backends and set the same rates everywhere"
        )

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        explanation = rank(problem, problem.options)
        if explanation.chosen is not None:
            return []
        return ["no installed backend can run it:\n" + str(explanation)]

    def _chosen(self, problem: AttentionProblem) -> tuple[Backend, AttentionProblem]:
        chosen = rank(problem, problem.options).chosen
        if chosen is None:
            raise BackendNotSupported(self.not_supported_reasons(problem)[0])
        return get_backend(chosen.backend), dataclasses.replace(problem, options=chosen.options)

    def estimate(self, problem: AttentionProblem) -> Cost:
        backend, inner = self._chosen(problem)
        return backend.estimate(inner)

    def plan(self, problem: AttentionProblem) -> Plan:
        backend, inner = self._chosen(problem)
        return plan_inner(backend, inner)


def explain(module: torch.nn.Module, x: torch.Tensor, kv: torch.Tensor | None = None, **forward_kwargs: Any):
    """The ranking ``backend="auto"`` makes for ``module(x, kv, **forward_kwargs)``; prints it on rank 0.

    Collective over the sp group like the call itself: a bad input on one rank raises the same
    error on every rank. Works for any module's settings (whatever its backend): it describes the
    problem the call would pose, with the module's ``auto`` options when its backend is ``auto``,
    and builds the chosen plan to show its kernels.
    """
    auto = get_backend("auto")
    options = module.options if isinstance(module.options, AutoOptions) else AutoOptions()
    call = dataclasses.replace(module._call(None, forward_kwargs.get("causal", False), ()), backend=auto,
                               options=options, what=f"mosaic.explain({module.description})")  # fmt: skip
    try:
        q, k, _ = module.project(x, kv)
        call = dataclasses.replace(call, kv_len=kv_len_int(forward_kwargs.get("kv_len")), batch_shape=(q.shape[0],))
    except (TypeError, ValueError) as exc:
        agreed_problem(None, None, call, error=exc)
        raise AssertionError("unreachable: agreed_problem raises the error it is given") from exc
    problem = agreed_problem(q, k, call)
    explanation = rank(problem, options)
    if explanation.chosen is not None:
        explanation = dataclasses.replace(explanation, plan=auto.plan(problem))
    if not is_initialized() or get_context().rank == 0:
        print(explanation)
    return explanation
