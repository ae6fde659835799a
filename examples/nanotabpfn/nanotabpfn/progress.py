"""A one-line progress bar: step, loss, throughput (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws one line on a terminal; prints a line every ``every`` steps otherwise (logs, torchrun)."""

    def __init__(self, total: int, start: int = 0, *, every: int = 10, stream: TextIO = sys.stdout, width: int = 24):
        self.total, self.step, self.every, self.stream, self.width = total, start, every, stream, width
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.first = start

    def update(self, step: int, loss: float, rows_per_s: float) -> None:
        """Report that ``step`` (1-based) finished with ``loss``."""
        self.step = step
        done = step / self.total
        bar = "#" * round(done * self.width)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        text = (
            f"[{bar:<{self.width}}] {step}/{self.total}  loss {loss:.4f}  {rows_per_s:,.0f} rows/s  "
            f"{elapsed:.0f}s elapsed, {eta:.0f}s left"
        )
        if self.tty:
            self.stream.write("\r" + text)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
