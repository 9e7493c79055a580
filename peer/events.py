"""What a peer reports about itself: human log lines, or one JSON object per line for `peer swarm`."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("shoal.peer")


class Events:
    def __init__(self, peer_id: str, json_lines: bool, stream: TextIO | None = None):
        self.peer_id = peer_id
        self.json_lines = json_lines
        self.stream = stream or sys.stdout
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        for listener in self.listeners:
            listener(kind, fields)
        if self.json_lines:
            record = {"event": kind, "peer": self.peer_id, "t": round(time.time(), 3), **fields}
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        else:
            text = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            log.info("[%s] %s %s", self.peer_id[:12], kind, text)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
