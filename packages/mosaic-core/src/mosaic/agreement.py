"""Agreement: the ranks of a group compare what they do when a plan is made and once per step.

A sharded call whose facts (shapes, ``kv_len``, options, ...) were planned
before runs its cached plan without any host exchange; this rank only
*records* it: its kind (forward, backward, a sharded helper), its call site
and a digest of its facts join a running log. The ranks compare that log

- when a plan is made (a plan-cache miss: the facts of the new problem travel
  too, so every rank plans from the same table),
- at the end of every backward pass that ran a sharded layer, at gradient
  reduction (``reduce_gradients``, the DDP and FSDP hooks) and at
  ``ctx.step()`` (loops without a backward),
- when a data collective of a call fails on this rank (a peer did not come
  within ``collective_timeout``),

in one small host collective (:meth:`Agreement.round`) over a gloo group of
their own. Every rank contributes a fixed-size row — what it is doing, its
count of agreements, the call site, an error code, how many calls it made
since the last agreement and their digest, and the facts — so every rank
holds the same table and decides alike:

- a rank whose local check failed sends its error instead of facts; every rank
  raises that error, the same type and message;
- ranks whose logs differ (one skipped a call, a backward, or a whole step of
  calls whose facts changed) all raise :class:`~mosaic.errors.CallMismatchError`
  naming the first call that differs;
- a rank whose data collective timed out finds the others at their next
  agreement and every rank raises the same error: the one a rank reported,
  or the mismatch;
- a rank that never comes makes the others raise :class:`~mosaic.errors.CollectiveTimeout`
  naming what they were doing and the rule.

Rows have a fixed size, so ranks at different points still pair up and see
each other's rows; texts (messages, the logs' call names) travel only on
failure, in two more collectives.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ._compat import all_gather_single
from .errors import RULE, BackendNotSupported, BackendUnavailable, CallMismatchError, CollectiveTimeout

__all__ = [
    "BACKWARD",
    "BUILD",
    "CALL",
    "FAILED",
    "FORWARD",
    "GRADIENTS",
    "HELPER",
    "INIT",
    "PLAN",
    "STEP",
    "Agreement",
    "lost",
    "site_id",
]

# Kinds of rounds (and of logged calls: FORWARD, BACKWARD, HELPER).
PLAN, STEP, FAILED, BUILD, HELPER, INIT, GRADIENTS, CALL, FORWARD, BACKWARD = range(1, 11)
_KINDS = {
    PLAN: "planning", STEP: "the end of a step", FAILED: "a failed collective", BUILD: "building a layer",
    HELPER: "a sharded helper", INIT: "mosaic.init", GRADIENTS: "reduce_gradients", CALL: "a sharded call",
    FORWARD: "forward", BACKWARD: "backward",
}  # fmt: skip
_MAGIC = 0x6D6F73  # "mos": a row that is not an agreement row means a collective paired with something else
_HEADER = 8  # magic, kind, round, site, error code, calls logged, their digest, fact count
ROW = 64
MAX_FACTS = ROW - _HEADER
_LOG_NAMES = 32  # calls whose names a mismatch message can quote


def site_id(description: str) -> int:
    """A call site's number, the same in every process for the same description."""
    return zlib.crc32(description.encode())


# Most specific first: an error travels as the index of its first match.
_ERRORS: tuple[type[BaseException], ...] = (
    BackendNotSupported, BackendUnavailable, CallMismatchError, CollectiveTimeout, TypeError, ValueError,
    RuntimeError,
)  # fmt: skip


def _code(error: BaseException | None) -> int:
    if error is None:
        return 0
    for i, cls in enumerate(_ERRORS):
        if isinstance(error, cls):
            return i + 1
    return len(_ERRORS)


class Agreement:
    """Agreement over one group: ``group`` is a gloo group, ``None`` for a group of one.

    ``name`` names the group in messages (``"sp"``, ``"world"``).
    """

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int, timeout: timedelta, name: str = "sp"):
        self.group, self.rank, self.size, self.timeout, self.name = group, rank, size, timeout, name
        self.rounds = 0  # host collectives so far (benchmarks and tests count them)
        self.calls = 0  # calls logged since the last agreement
        self._digest = 0
        self._names: list[str] = []
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # facts agreed by once()
        # Called on every rank of a round in which a rank reported a failed collective, before the agreed error
        # is raised: the groups that collective ran on may be closed (gloo), and every rank must remake them.
        self.on_broken: Callable[[], None] | None = None

    @property
    def alone(self) -> bool:
        return self.group is None or self.size == 1

    def record(self, kind: int, what: str, digest: int = 0) -> None:
        """Log a call that needed no agreement (its plan was cached); the next agreement compares the logs."""
        if self.alone:
            return
        self.calls += 1
        self._digest = zlib.crc32(f"{kind}:{what}:{digest};".encode(), self._digest)
        if len(self._names) < _LOG_NAMES:
            self._names.append(f"{_KINDS[kind]} of {what}")

    def once(self, what: str, facts: Sequence[int], differ: Callable[[list[tuple[int, ...]]], str]) -> None:
        """Agree on ``facts`` the first time they come at ``what`` (a ``ValueError`` from ``differ(rows)`` on
        every rank when the ranks' facts differ); afterwards only log them, like a cached plan."""
        key = (what, tuple(facts))
        if self.alone:
            return
        if key in self._seen:
            self._seen.move_to_end(key)
            self.record(HELPER, what, zlib.crc32(repr(key).encode()))
            return
        rows = self.round(HELPER, what, facts)
        if len(set(rows)) != 1:
            raise ValueError(differ(rows))
        self._seen[key] = None
        if len(self._seen) > 512:
            self._seen.popitem(last=False)

    def round(
        self,
        kind: int,
        what: str,
        facts: Sequence[int] = (),
        error: BaseException | None = None,
        site: int | None = None,
    ) -> list[tuple[int, ...]]:
        """Every rank's ``facts`` (rows in group-rank order), or the same exception on every rank.

        Args:
            kind: ``PLAN``, ``STEP``, ``FAILED``, ...
            what: the call in words, for messages (e.g. the module's description).
            facts: at most ``MAX_FACTS`` integers.
            error: this rank's local failure; every rank then raises it.
            site: the call site (default: from ``what``); ranks at different sites mismatch.
        """
        facts = [int(f) for f in facts] if error is None else []
        if len(facts) > MAX_FACTS:
            raise ValueError(f"at most {MAX_FACTS} facts fit an agreement row, got {len(facts)}")
        if self.alone:
            if error is not None:
                raise error
            return [tuple(facts)]
        site = site_id(what) if site is None else site
        row = [_MAGIC, kind, self.rounds, site, _code(error), self.calls, self._digest, len(facts), *facts]
        table = self._gather(torch.tensor(row + [0] * (ROW - len(row)), dtype=torch.int64), what, kind).tolist()
        self.rounds += 1
        aligned = all(r[0] == _MAGIC and r[1:4] == table[0][1:4] and r[5:7] == table[0][5:7] for r in table)
        failed = [r for r, values in enumerate(table) if values[4]]
        if aligned and not failed and kind != FAILED:
            self._reset()
            return [tuple(r[_HEADER : _HEADER + r[7]]) for r in table]
        texts = self._gather_text(f"{what}\x00{'' if error is None else error}\x00{'; '.join(self._names)}", what)
        self._reset()
        if self.on_broken is not None and any(r[0] == _MAGIC and r[1] == FAILED for r in table):
            self._seen.clear()
            self.on_broken()
        if failed:
            raise self._failure(table, texts, failed, error)
        raise self._mismatch(table, texts)

    def share(self, text: str, what: str) -> list[str]:
        """Every rank's ``text``, for a message all ranks build alike after a round every rank saw."""
        if self.alone:
            return [text]
        return self._gather_text(text, what)

    def _reset(self) -> None:
        self.calls, self._digest, self._names = 0, 0, []

    def _gather(self, mine: torch.Tensor, what: str, kind: int = HELPER) -> torch.Tensor:
        out = torch.empty(self.size * mine.numel(), dtype=mine.dtype)
        try:
            all_gather_single(out, mine, group=self.group)
        except RuntimeError as exc:
            raise CollectiveTimeout(
                f"the ranks of the {self.name} group did not all reach {_KINDS.get(kind, 'an agreement')} of "
                f"{what} (agreement {self.rounds} of this rank) within {self.timeout.total_seconds():.0f} s, "
                f"or a peer left: another rank raised, skipped a call or a step, or is stuck elsewhere. Rule: "
                f"{RULE}. ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        return out.view(self.size, mine.numel())

    def _gather_text(self, text: str, what: str) -> list[str]:
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        lengths = self._gather(torch.tensor([data.numel()], dtype=torch.int64), what).flatten().tolist()
        padded = torch.cat([data, torch.zeros(max(lengths) - data.numel(), dtype=torch.uint8)])
        blob = self._gather(padded, what)
        return [bytes(blob[r, :n].tolist()).decode(errors="replace") for r, n in enumerate(lengths)]

    def _doing(self, table: list[list[int]], texts: list[str], r: int) -> str:
        row = table[r]
        if row[0] != _MAGIC:
            return f"{self.name} rank {r}: a collective that is not Mosaic's agreement"
        what = texts[r].split("\x00")[0]
        since = f"after {row[5]} call(s) since the last agreement"
        return f"{self.name} rank {r}: {_KINDS.get(row[1], '?')} of {what}, {since}"

    def _mismatch(self, table: list[list[int]], texts: list[str]) -> BaseException:
        listed = "; ".join(self._doing(table, texts, r) for r in range(self.size))
        logs = [t.split("\x00")[2].split("; ") if t.count("\x00") >= 2 and t.split("\x00")[2] else [] for t in texts]
        first = next((i for i in range(max(map(len, logs), default=0))
                      if len({tuple(log[i : i + 1]) for log in logs}) > 1), None)  # fmt: skip
        differs = ""
        if first is not None:
            calls = ", ".join(f"rank {r}: {log[first] if first < len(log) else 'no call'}"
                              for r, log in enumerate(logs))  # fmt: skip
            differs = f" The first call that differs is call {first + 1} since the last agreement ({calls})."
        same_logs = len({tuple(row[5:7]) for row in table}) == 1
        if same_logs and all(row[1] == FAILED for row in table if row[0] == _MAGIC):
            return CollectiveTimeout(
                f"a collective of the {self.name} group did not complete on any rank — {listed}. {RULE}"
            )

        return CallMismatchError(
            f"the ranks of the {self.name} group are at different sharded calls — {listed}.{differs} {RULE}"
        )

    def _failure(
        self, table: list[list[int]], texts: list[str], failed: list[int], error: BaseException | None
    ) -> BaseException:
        messages: dict[str, list[int]] = {}
        for r in failed:
            messages.setdefault(texts[r].split("\x00")[1], []).append(r)
        text = "; ".join(f"{m} [{self.name} rank(s) {ranks}]" for m, ranks in messages.items())
        cls = _ERRORS[table[failed[0]][4] - 1]
        raised = cls(f"{text} (raised together on every rank of the {self.name} group)")
        if error is not None:
            raised.__cause__ = error
        return raised


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` from a collective means a peer did not come (a timeout) or is gone."""
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset", "connectFullMesh",
                            "pair closure", "Application timeout")
    )  # fmt: skip
