"""Reading a `peer join --json-events` process's stdout in a benchmark (bench.link, bench.join_memory)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO


def pump_events(
    stdout: Iterable[str], log: TextIO, deliver: Callable[[dict[str, Any]], None], stamp: bool = False
) -> None:
    """Until the process's stdout ends: every line copied to `log` (flushed: a killed run keeps it), every
    JSON object handed to `deliver` (with `t`, the time it was read, when `stamp` and it has none)."""
    with contextlib.suppress(ValueError, OSError):  # the pipe or the log closed under us: the run is over
        for line in stdout:
            log.write(line)
            log.flush()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                if stamp:
                    event.setdefault("t", time.time())
                deliver(event)
