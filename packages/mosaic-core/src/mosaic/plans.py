"""Plans by their facts: build once, then only execute.

A backend's plan for a problem is decided from facts every rank shares, so
it is cached under those facts: a call with the same facts runs the cached
plan and nothing else. Every rank's cache sees the same sequence of keys in
a correct program (the same calls in the same order), so ranks hit and miss
together, and a miss is where they agree (:mod:`mosaic.agreement`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from .backend import Backend, Plan
from .problem import AttentionProblem

__all__ = ["PlanCache", "build_plan", "plan_inner"]

V = TypeVar("V")


class PlanCache(Generic[V]):
    """A least-recently-used map with room for ``size`` entries (the same eviction order on every rank)."""

    def __init__(self, size: int = 512):
        self.size = size
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        # Entries compiled graphs run, by position: a graph reaches its entry through this list (a place
        # dynamo can guard), never evicted while the cache lives.
        self.traced: list[V] = []

    def pin(self, value: V) -> int:
        """``value``'s position in :attr:`traced` (added the first time)."""
        for i, held in enumerate(self.traced):
            if held is value:
                return i
        self.traced.append(value)
        return len(self.traced) - 1

    def get(self, key: Hashable) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def values(self) -> list[V]:
        """The entries held, oldest first."""
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self.traced = []  # a new list: graphs guarded on the old one retrace

    def __len__(self) -> int:
        return len(self._entries)


_local: PlanCache[Plan] = PlanCache()


def build_plan(backend: Backend, problem: AttentionProblem, cache: PlanCache[Plan] | None = None) -> Plan:
    """``backend``'s plan for ``problem`` (checked first: a problem it can't run raises, listing why), cached."""
    cache = _local if cache is None else cache
    key = (backend.name, id(backend), problem.key)
    plan = cache.get(key)
    if plan is None:
        backend.check(problem)
        plan = backend.plan(problem)
        cache.put(key, plan)
    return plan


def plan_inner(backend: Backend, problem: AttentionProblem) -> Plan:
    """The plan of a strategy a composition runs inside its own (the same cache as the outer call's)."""
    context = problem.context
    return build_plan(backend, problem, None if context is None else context.inner_plans)
