"""Progress of a long command (backfill, replay): a tqdm bar on a terminal, else plain lines."""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_PROGRESS_S = 5.0  # a line this often when stderr is not a terminal


class Progress:
    """A tqdm bar on a terminal (events/s, ETA); otherwise a plain line every few seconds."""

    def __init__(self, name: str, total: int, done: int, unit: str = "lines") -> None:
        self.name, self.unit, self.total, self.done = name, unit, total, done
        self.started = time.monotonic()
        self.first = done
        self.next_line = self.started + PLAIN_PROGRESS_S
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=name, unit=f" {unit}")

    def advance(self, lines: int) -> None:
        """`lines` more are settled."""
        self.done += lines
        if self.bar is not None:
            self.bar.update(lines)
            return
        now = time.monotonic()
        if now >= self.next_line or self.done >= self.total:
            self.next_line = now + PLAIN_PROGRESS_S
            rate = (self.done - self.first) / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(
                f"{self.name}: {self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
                f"ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
