"""Log lines that repeat during an outage, thinned to one per reason per window.

Owns: which repeated lines are written and how many were left out since
the last one written. Knows nothing of what the lines are about.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Distinct reasons remembered at most; past it, reasons whose window is over are forgotten first.
MAX_REASONS = 256


class LogLimiter:
    """At most one line per distinct reason per `window` seconds; the next line written counts the others.

    Safe to call from many requests at once on one event loop: the table is
    only read and written between awaits, by `admit`. Bounded: at most
    MAX_REASONS reasons are remembered; when every one of them is still in
    its window, a new reason is written without being remembered.
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # reason -> (when last written, left out since)

    def admit(self, reason: str) -> int | None:
        """None when a line for `reason` must be left out now; else the count left out since the last one."""
        now = self._clock()
        last = self._seen.get(reason)
        if last is not None and now - last[0] < self._window:
            self._seen[reason] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= MAX_REASONS:
            self._seen = {key: seen for key, seen in self._seen.items() if now - seen[0] < self._window}
            if len(self._seen) >= MAX_REASONS:
                return 0
        self._seen[reason] = (now, 0)
        return last[1] if last is not None else 0

    def line(self, reason: str) -> str | None:
        """The line to write for `reason` now, with the count left out since the last; None to leave it out."""
        left_out = self.admit(reason)
        if left_out is None:
            return None
        if left_out == 0:
            return reason
        return f"{reason} ({left_out} more like it since the last such line)"
