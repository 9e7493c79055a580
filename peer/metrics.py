"""A Prometheus endpoint (off by default; `peer join --metrics HOST:PORT`) and JSON log lines (`--log-json`).

The endpoint is a deliberately tiny HTTP/1.0 responder: it reads one request head (bounded in size and
time), answers `GET /metrics` with the text exposition format, and closes. Nothing else is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # a scraper's GET line and headers
REQUEST_TIMEOUT = 5.0

# name, type, help, the status field it reads
GAUGES = [
    ("shoal_round", "gauge", "The outer round this peer is in.", "round"),
    ("shoal_inner_step", "counter", "Inner optimizer steps taken.", "inner_step"),
    ("shoal_inner_steps_per_second", "gauge", "Recent inner-step throughput.", "inner_steps_per_s"),
    ("shoal_train_loss", "gauge", "Latest training loss (nats per byte).", "train_loss"),
    ("shoal_eval_loss", "gauge", "Latest evaluation loss of the slow weights (nats per byte).", "eval_loss"),
    ("shoal_bytes_sent_per_round", "gauge", "Mean bytes sent per round.", "bytes_sent_per_round"),
    ("shoal_bytes_received_per_round", "gauge", "Mean bytes received per round.", "bytes_received_per_round"),
    ("shoal_bits_per_parameter", "gauge", "Bits per parameter of the last payload sent.", "bits_per_param"),
    ("shoal_rounds_total", "counter", "Rounds finished.", "rounds_done"),
    ("shoal_rounds_swapped_total", "counter", "Rounds that applied a partner's update.", "rounds_swapped"),
    ("shoal_peers_known", "gauge", "Members of the run this peer knows of.", "peers_known"),
    ("shoal_peers_live", "gauge", "Members of the run this peer believes alive.", "peers_live"),
]


def exposition(status: dict[str, Any]) -> str:
    labels = f'{{peer="{status.get("peer_id", "")}",run="{status.get("run", "")}"}}'
    lines = []
    for name, kind, help_text, field in GAUGES:
        value = status.get(field)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {float(value)!r}"]
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]]):
        self.host, self.port = host, port
        self.status = status
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].split()
            if request_line[:2] == [b"GET", b"/metrics"]:
                body, status_line = exposition(self.status()).encode(), b"200 OK"
            else:
                body, status_line = b"only GET /metrics is served here\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.0 " + status_line + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
