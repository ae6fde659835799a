"""Agree before acting: every rank of a group shows its facts, and fails with the others.

Every sharded call (and its backward, and ``reduce_gradients``) starts with
one small host collective over a gloo group of its own, the *guard*: each
rank contributes a fixed-size row of integers — what it is doing (forward,
backward, ...), how many guarded calls it has made, which call site, an
error code, and the facts of its input. Then every rank holds the same
table and decides the same way:

- a rank whose local check failed (a wrong dtype, a float ``kv_len``) sends
  its error instead of facts; every rank raises that error, with the same
  message and type, instead of the others hanging in the next collective;
- ranks at different calls (one skipped a call, or its backward: its forward
  meets the others' backward) all raise :class:`~mosaic.errors.CallMismatchError`
  naming what each rank was doing;
- a rank that never comes (it skipped the rest of the step, or it is stuck)
  makes the others raise :class:`~mosaic.errors.CollectiveTimeout` after the
  guard's timeout, which is short (``mosaic.init(collective_timeout=...)``, 60 s
  by default) because the guard moves only a few hundred bytes;
- facts that must be equal are compared by the caller on the same table, so
  a disagreement raises the same error on every rank.

Rows have a fixed size, so that two ranks at different guarded calls still
pair up in one collective and see each other's rows instead of hanging or
aborting on mismatched sizes; messages travel only on failure, in a second
and third collective.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ._compat import all_gather_single
from .errors import RULE, CallMismatchError, CollectiveTimeout

__all__ = ["BACKWARD", "FORWARD", "GRADIENTS", "HELPER", "INIT", "Guard", "site_id"]

FORWARD, BACKWARD, GRADIENTS, HELPER, INIT = 1, 2, 3, 4, 5
_KINDS = {FORWARD: "forward", BACKWARD: "backward", GRADIENTS: "reduce_gradients", HELPER: "helper", INIT: "init"}
_MAGIC = 0x6D6F73  # "mos": a row that is not a guard row means a collective paired with something else
_HEADER = 6  # magic, kind, call, site, error code, fact count
ROW = 64
MAX_FACTS = ROW - _HEADER


def site_id(description: str) -> int:
    """A call site's number, the same in every process for the same description."""
    return zlib.crc32(description.encode())


def _error_classes():
    # Most specific first: an error travels as the index of its first match.
    from .backend import BackendNotSupported
    from .registry import BackendUnavailable

    return (BackendNotSupported, BackendUnavailable, TypeError, ValueError, RuntimeError)


def _code(error: BaseException | None) -> int:
    if error is None:
        return 0
    for i, cls in enumerate(_error_classes()):
        if isinstance(error, cls):
            return i + 1
    return len(_error_classes())


class Guard:
    """The guard of one group: ``group`` is a gloo group, ``None`` for a group of one."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int, timeout: timedelta, name: str = "sp"):
        self.group, self.rank, self.size, self.timeout, self.name = group, rank, size, timeout, name
        self.calls = 0

    def agree(
        self,
        kind: int,
        what: str,
        facts: Sequence[int] = (),
        error: BaseException | None = None,
        site: int | None = None,
    ) -> list[tuple[int, ...]]:
        """Every rank's ``facts`` (rows in group-rank order), or the same exception on every rank.

        Args:
            kind: ``FORWARD``, ``BACKWARD``, ...
            what: the call in words, for messages (e.g. the module's description).
            facts: at most ``MAX_FACTS`` integers.
            error: this rank's local failure; every rank then raises it.
            site: the call site (default: from ``what``).
        """
        self.calls += 1
        facts = [int(f) for f in facts] if error is None else []
        if len(facts) > MAX_FACTS:
            raise ValueError(f"at most {MAX_FACTS} facts fit a guard row, got {len(facts)}")
        if self.group is None or self.size == 1:
            if error is not None:
                raise error
            return [tuple(facts)]
        site = site_id(what) if site is None else site
        row = [_MAGIC, kind, self.calls, site, _code(error), len(facts), *facts]
        table = self._gather(torch.tensor(row + [0] * (ROW - len(row)), dtype=torch.int64), what)
        rows = table.tolist()
        aligned = all(r[0] == _MAGIC and r[1:4] == rows[0][1:4] for r in rows)
        failed = [r for r, values in enumerate(rows) if values[4]]
        if aligned and not failed:
            return [tuple(r[_HEADER : _HEADER + r[5]]) for r in rows]
        texts = self._gather_text(f"{what}\x00{'' if error is None else error}", what)
        if not aligned:
            raise self._mismatch(rows, texts)
        raise self._failure(rows, texts, failed, error)

    def share(self, text: str, what: str) -> list[str]:
        """Every rank's ``text``, for a message all ranks build alike after an agreed failure.

        Call it on every rank at the same point (after rows every rank saw, so all of them know to).
        """
        if self.group is None or self.size == 1:
            return [text]
        return self._gather_text(text, what)

    def _gather(self, mine: torch.Tensor, what: str) -> torch.Tensor:
        out = torch.empty(self.size * mine.numel(), dtype=mine.dtype)
        try:
            all_gather_single(out, mine, group=self.group)
        except RuntimeError as exc:
            raise CollectiveTimeout(
                f"the ranks of the {self.name} group did not all reach {what} (guarded call {self.calls} of this "
                f"rank) within {self.timeout.total_seconds():.0f} s, or a peer left: another rank raised, skipped "
                f"this call or is stuck elsewhere. Rule: {RULE}. ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        return out.view(self.size, mine.numel())

    def _gather_text(self, text: str, what: str) -> list[str]:
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        lengths = self._gather(torch.tensor([data.numel()], dtype=torch.int64), what).flatten().tolist()
        width = max(lengths)
        padded = torch.cat([data, torch.zeros(width - data.numel(), dtype=torch.uint8)])
        blob = self._gather(padded, what)
        return [bytes(blob[r, :n].tolist()).decode(errors="replace") for r, n in enumerate(lengths)]

    def _mismatch(self, rows: list[list[int]], texts: list[str]) -> CallMismatchError:
        def doing(r: int) -> str:
            if rows[r][0] != _MAGIC:
                return f"{self.name} rank {r}: a collective that is not Mosaic's guard"
            kind = _KINDS.get(rows[r][1], "?")
            return f"{self.name} rank {r}: {kind} of {texts[r].split(chr(0))[0]} (guarded call {rows[r][2]})"

        listed = "; ".join(doing(r) for r in range(self.size))
        return CallMismatchError(
            f"the ranks of the {self.name} group are at different sharded calls — {listed}. {RULE}"
        )

    def _failure(
        self, rows: list[list[int]], texts: list[str], failed: list[int], error: BaseException | None
    ) -> BaseException:
        messages: dict[str, list[int]] = {}
        for r in failed:
            messages.setdefault(texts[r].split("\x00", 1)[1], []).append(r)
        text = "; ".join(f"{m} [{self.name} rank(s) {ranks}]" for m, ranks in messages.items())
        cls = _error_classes()[rows[failed[0]][4] - 1]
        raised = cls(f"{text} (raised together on every rank of the {self.name} group)")
        if error is not None:
            raised.__cause__ = error
        return raised
