"""A Prometheus endpoint (off by default; `peer join --metrics HOST:PORT`).

The endpoint is a deliberately tiny HTTP/1.0 responder: it reads one request head (bounded in size and
time), answers `GET /metrics` with the text exposition format, and closes. Nothing else is served.

Names follow Prometheus's conventions: `shoal_` first, the unit in the name (`_seconds`, `_bytes`), counters
end in `_total`, every family has its `# HELP` and `# TYPE` lines, and every series carries the labels
`peer` and `run`. deploy/grafana/shoal-dashboard.json queries these names (a test keeps them in step).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # a scraper's GET line and headers
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "gauge", "counter" (its name ends in _total) or "summary" (exported as _sum and _count)
    help: str
    field: str  # the status field it reads (a list counts its items); a summary's sum
    count_field: str = ""  # a summary's count


METRICS = (
    Metric("shoal_round", "gauge", "The outer round this peer is in.", "round"),
    Metric("shoal_inner_step", "gauge",
           "The run's inner-step count as this peer follows it (it jumps ahead when the peer catches up).",
           "inner_step"),
    Metric("shoal_inner_steps_per_second", "gauge", "Recent inner-step throughput.", "inner_steps_per_s"),
    Metric("shoal_train_loss", "gauge", "Latest training loss, in nats per byte.", "train_loss"),
    Metric("shoal_eval_loss", "gauge", "Latest evaluation loss of the slow weights, in nats per byte.",
           "eval_loss"),
    Metric("shoal_rounds_total", "counter", "Rounds finished, swapped or skipped.", "rounds_done"),
    Metric("shoal_rounds_swapped_total", "counter", "Rounds that applied a partner's update.",
           "rounds_swapped"),
    Metric("shoal_sent_bytes_total", "counter", "Bytes of round messages sent to partners.",
           "bytes_sent_total"),
    Metric("shoal_received_bytes_total", "counter", "Bytes of round messages received from partners.",
           "bytes_received_total"),
    Metric("shoal_exchange_duration_seconds", "summary",
           "Time each round's exchange took, from its message to the partner's (or the skip).",
           "exchange_seconds_total", "rounds_done"),
    Metric("shoal_bits_per_parameter", "gauge", "Bits per parameter of the last round message sent.",
           "bits_per_param"),
    Metric("shoal_partners", "gauge", "Distinct partners this peer has exchanged with.", "partners"),
    Metric("shoal_peers_known", "gauge", "Members of the run this peer knows of.", "peers_known"),
    Metric("shoal_peers_live", "gauge", "Members of the run this peer believes alive.", "peers_live"),
    Metric("shoal_banned_peers", "gauge", "Peers this peer has banned.", "bans"),
)  # fmt: skip


def series_names() -> set[str]:
    """Every series name the endpoint can export (a summary's as NAME_sum and NAME_count)."""
    names = set()
    for metric in METRICS:
        names |= {f"{metric.name}_sum", f"{metric.name}_count"} if metric.kind == "summary" else {metric.name}
    return names


def _number(value: Any) -> float | None:
    if isinstance(value, list | tuple | set | frozenset):
        return float(len(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _sample(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(status: dict[str, Any]) -> str:
    """The text exposition format (version 0.0.4) of the status: families whose value is known yet."""
    labels = f'{{peer="{_label(status.get("peer_id", ""))}",run="{_label(status.get("run", ""))}"}}'
    lines = []
    for metric in METRICS:
        value = _number(status.get(metric.field))
        if value is None:
            continue
        samples = [(metric.name, value)]
        if metric.kind == "summary":
            count = _number(status.get(metric.count_field))
            if count is None:
                continue
            samples = [(f"{metric.name}_sum", value), (f"{metric.name}_count", count)]
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        lines += [f"{name}{labels} {_sample(v)}" for name, v in samples]
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
