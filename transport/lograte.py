"""Log lines about what strangers do, at a bounded rate: a flood of refusals must not become a flood of lines.

The first few events of a kind from one source in a window are logged as they come; the rest are counted
and summed up in one line when the window ends ("refused 412 connections from 10.0.0.7 in the last 60 s:
over the per-address cap"). An attacker decides how often events happen, never how many lines we write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

WINDOW_S = 60.0
BURST = 3  # lines per (kind, source) per window before the rest are only counted
MAX_KEYS = 1024  # (kind, source) pairs tracked at once; past it new sources share one summary


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0
    why: str = ""


class LogThrottle:
    def __init__(self, logger: logging.Logger, window_s: float = WINDOW_S, burst: int = BURST) -> None:
        self.logger = logger
        self.window_s = window_s
        self.burst = burst
        self._windows: dict[tuple[str, str], _Window] = {}

    def note(self, level: int, what: str, source: str, why: str, now: float | None = None) -> None:
        """One event: `what` (e.g. "refused connection") from `source`, because `why`."""
        now = time.monotonic() if now is None else now
        self.flush(now)
        key = (what, source)
        if key not in self._windows and len(self._windows) >= MAX_KEYS:
            key = (what, "other sources")
        window = self._windows.setdefault(key, _Window(now))
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, "%s from %s: %s", what, source, why)
        else:
            window.suppressed += 1
            window.why = why

    def flush(self, now: float | None = None) -> None:
        """Sums up and forgets every window that has ended."""
        now = time.monotonic() if now is None else now
        for key, window in list(self._windows.items()):
            if now - window.started < self.window_s:
                continue
            del self._windows[key]
            if window.suppressed:
                what, source = key
                self.logger.warning(
                    "%s from %s: %d more in the last %.0f s (%s)",
                    what,
                    source,
                    window.suppressed,
                    self.window_s,
                    window.why,
                )
