"""Progress of a long run on standard error: a live bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns, which a log file or a CI console keeps as one
unreadable line; when standard error is not a terminal this writes one line every few seconds
instead ("scanned 120/5000 images, 3.1 per s, about 26 min left").
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "plural"]


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 error``, ``2 errors`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


class Progress:
    """Count work done out of ``total``; ``enabled`` False shows nothing."""

    def __init__(self, total: int, *, enabled: bool = True, unit: str = "image", verb: str = "scanned",
                 stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.total, self.unit, self.verb, self.interval = total, unit, verb, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self._bar = None
        self._enabled = enabled and total > 0
        self._t0 = self._last = time.monotonic()
        if self._enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self._enabled and now - self._last >= self.interval and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
            print(f"{self.verb} {self.done}/{plural(self.total, self.unit)}, {rate:.2f} per s{eta}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
