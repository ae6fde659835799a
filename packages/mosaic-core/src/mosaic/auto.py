"""``backend="auto"`` and ``mosaic.explain``: rank every installed strategy by its plan's cost.

For a problem, every installed backend is asked (in the manner of xformers'
dispatch walk) for the option sets worth trying (``Backend.candidate_options``:
the defaults, every mesh shape of the group, ...); each one that accepts the
problem plans it, and :meth:`mosaic.cost.Machine.seconds` turns the plan's
:class:`~mosaic.cost.Cost` into an estimate. The cheapest plan whose memory
fits the budget runs. Plans and costs are decided from facts every rank
shares, and the pick is checked across the sp group once per problem, so
every rank runs the same strategy. :func:`explain` returns (and prints) the
whole ranking, with every rejected backend's reasons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .backend import Backend, BackendNotSupported, Capabilities, Plan
from .cost import Cost, Machine, default_machine
from .guard import HELPER, site_id
from .kernels import ranking
from .options import Options
from .problem import AttentionProblem
from .registry import BackendUnavailable, available_backends, get_backend

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
    plan: Plan | None = None

    @property
    def accepted(self) -> bool:
        return not self.reasons


@dataclass(frozen=True)
class Explanation:
    """The ranking ``auto`` made for one problem: accepted candidates fastest first, then the rejected."""

    problem: AttentionProblem
    machine: Machine
    candidates: tuple[Candidate, ...]

    @property
    def chosen(self) -> Candidate | None:
        accepted = [c for c in self.candidates if c.accepted]
        return accepted[0] if accepted else None

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)

    def __str__(self) -> str:
        p = self.problem
        lines = [
            f"attention of batch' {p.batch}, {p.heads} heads ({p.kv_heads} kv), head dim {p.head_dim}, "
            f"{p.q_layout.total} queries x {p.kv_layout.total} keys over {p.size} ranks"
            f"{f', kv_len {p.kv_len}' if p.kv_len is not None else ''}{', causal' if p.causal else ''}, {p.dtype}",
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
                if c.plan is not None and c.plan.kernels():
                    lines.append(f"{'':<18}kernels: {', '.join(c.plan.kernels())}")
        if self.chosen is not None and self.chosen.plan is not None:
            lines += _kernel_lines(self.chosen.plan)
        for c in self.candidates:
            if not c.accepted:
                lines.append(f"{c.backend:<16}{((c.options and str(c.options)) or '')[:61]:<62}  rejected:")
                lines += [f"{'':<18}- {r}" for r in c.reasons]
        return "\n".join(lines)


def rank(problem: AttentionProblem, options: AutoOptions | None = None) -> Explanation:
    """Every candidate for ``problem``, accepted ones cheapest first (ties by name), then the rejected."""
    from .functional import plan_for

    options = options or AutoOptions()
    machine = default_machine(problem.device)
    if options.memory_budget is not None:
        machine = dataclasses.replace(machine, memory_budget=options.memory_budget)
    names = options.candidates or tuple(n for n in available_backends() if n != "auto")
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
            found.append(_candidate(backend, dataclasses.replace(problem, options=opts), machine, plan_for))
    accepted = sorted((c for c in found if c.accepted), key=lambda c: (c.seconds, c.backend, str(c.options)))
    return Explanation(problem, machine, tuple(accepted + [c for c in found if not c.accepted]))


def _candidate(backend: Backend, problem: AttentionProblem, machine: Machine, plan_for) -> Candidate:
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        return Candidate(backend.name, problem.options, reasons=tuple(reasons))
    plan = plan_for(backend, problem, problem.context)
    if not machine.fits(plan.cost):
        why = (
            f"needs {plan.cost.memory / 2**30:.2f} GiB per rank, over the budget of {machine.memory_budget / 2**30:.2f}"
        )
        return Candidate(backend.name, problem.options, cost=plan.cost, reasons=(why,))
    return Candidate(backend.name, problem.options, machine.seconds(plan.cost), plan.cost, plan=plan)


def _kernel_lines(plan: Plan) -> list[str]:
    """Why the chosen plan's largest block runs on its kernel and not on the others."""
    pieces = plan.block_pieces()
    if not pieces:
        return []
    largest = max(pieces, key=lambda p: p.q_len * p.k_len)
    spec = plan.problem.block_spec(largest.q_len, largest.k_len, largest.causal)
    lines = [f"kernels for the chosen plan's largest block ({spec.q_len} x {spec.k_len} rows):"]
    return lines + [f"  {name:<12}{verdict}" for name, verdict in ranking(spec, largest.kernel)]


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} bytes"


class AutoBackend(Backend):
    """The cheapest installed strategy for each problem, by its plan's cost (``mosaic.explain`` shows why)."""

    name = "auto"
    capabilities = Capabilities()
    Options = AutoOptions

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        if rank(problem, problem.options).chosen is not None:
            return []
        return ["no installed backend can run it:\n" + str(rank(problem, problem.options))]

    def plan(self, problem: AttentionProblem) -> Plan:
        chosen = rank(problem, problem.options).chosen
        if chosen is None:
            raise BackendNotSupported(self.not_supported_reasons(problem)[0])
        if problem.context is not None:
            # Installed packages or rates set by hand could differ between ranks: check the pick.
            rows = problem.context.guard.agree(HELPER, "backend='auto'", [site_id(f"{chosen.backend}{chosen.options}")])
            if len(set(rows)) != 1:
                raise BackendNotSupported(
                    "backend='auto' chose different strategies on different ranks (different packages installed, "
                    "or different rates from mosaic.cost.set_machine/calibrate); install the same backends everywhere"
                )
        return chosen.plan


def explain(module: torch.nn.Module, x: torch.Tensor, kv: torch.Tensor | None = None, **forward_kwargs: Any):
    """The ranking ``backend="auto"`` makes for ``module(x, kv, **forward_kwargs)``; prints it on rank 0.

    Collective over the sp group like the call itself. Works for any module's
    settings (whatever its backend): it describes the problem the call would pose,
    with the module's ``auto`` options when its backend is ``auto``.
    """
    from .context import get_context, is_initialized
    from .functional import agreed_problem

    q, k, _ = module.project(x, kv)
    call = module._call(forward_kwargs.get("kv_len"), forward_kwargs.get("causal", False), None, (q.shape[0],))
    options = module.options if isinstance(module.options, AutoOptions) else AutoOptions()
    call = dataclasses.replace(call, backend=get_backend("auto"), options=options, declared=-1)
    ctx = get_context() if is_initialized() else None
    problem = agreed_problem(q, k, call, ctx)
    explanation = rank(problem, options)
    if ctx is None or ctx.rank == 0:
        print(explanation)
    return explanation
