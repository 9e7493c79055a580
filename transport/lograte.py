"""Log lines about what strangers do, at a bounded rate: a flood of refusals must not become a flood of lines.

The first few events of a kind in a window are logged as they come; the rest are counted and summed up
in one line when the window ends ("refused connections: 412 more in the last 60 s from 32 sources, the
last from 10.0.0.7: over the per-address cap"). The budget is per kind, not per source, so an attacker
with many identities or addresses decides how often events happen, never how many lines we write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

WINDOW_S = 60.0
BURST = 3  # lines per kind per window before the rest are only counted
MAX_SOURCES = 4096  # distinct sources counted per window; past it they are counted as one


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0
    sources: set[str] = field(default_factory=set)
    last: str = ""


class LogThrottle:
    def __init__(self, logger: logging.Logger, window_s: float = WINDOW_S, burst: int = BURST) -> None:
        self.logger = logger
        self.window_s = window_s
        self.burst = burst
        self._windows: dict[str, _Window] = {}

    def note(self, level: int, what: str, source: str, why: str, now: float | None = None) -> None:
        """One event: `what` (e.g. "refused a connection") from `source`, because `why`."""
        now = time.monotonic() if now is None else now
        self.flush(now)
        window = self._windows.setdefault(what, _Window(now))
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, "%s from %s: %s", what, source, why)
            return
        window.suppressed += 1
        if len(window.sources) < MAX_SOURCES:
            window.sources.add(source)
        window.last = f"{source}: {why}"

    def flush(self, now: float | None = None) -> None:
        """Sums up and forgets every window that has ended."""
        now = time.monotonic() if now is None else now
        for what, window in list(self._windows.items()):
            if now - window.started < self.window_s:
                continue
            del self._windows[what]
            if window.suppressed:
                self.logger.warning(
                    "%s: %d more in the last %.0f s from %d sources, the last from %s",
                    what,
                    window.suppressed,
                    self.window_s,
                    len(window.sources),
                    window.last,
                )
