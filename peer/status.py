"""What the peer is doing right now, kept for `peer status`, the REPL and the metrics endpoint.

The board listens to the daemon's events (the same ones `--json-events` prints) and to the daemon's
notes about what it is waiting for; it never reaches into the daemon. Histories are bounded.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

ROUND_HISTORY = 200  # rounds kept for `rounds` and per-partner link figures
LOSS_HISTORY = 1000
LOG_LINES = 500


@dataclass
class Activity:
    """One sentence's worth of what the peer is busy with, and since when."""

    what: str  # "starting", "joining", "training", "exchanging", "waiting", "stopping", "done"
    detail: str
    since: float = field(default_factory=time.monotonic)


@dataclass
class LinkStats:
    partner: str
    exchanges: int = 0
    last_outcome: str = ""
    last_exchange_at: float = 0.0
    last_seconds: float = 0.0
    last_bytes: int = 0


class LogTail(logging.Handler):
    """Keeps the last LOG_LINES formatted log lines for the REPL's `log` command."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class StatusBoard:
    def __init__(self, peer_id: str, run_id: str):
        self.peer_id = peer_id
        self.run_id = run_id
        self.started_at = time.time()
        self.address = ""
        self.activity = Activity("starting", "starting the daemon")
        self.values: dict[str, Any] = {"round": 0, "inner_step": 0}
        self.rounds: collections.deque[dict[str, Any]] = collections.deque(maxlen=ROUND_HISTORY)
        self.losses: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOSS_HISTORY)
        self.links: dict[str, LinkStats] = {}
        self.last_error = ""
        # Partners whose link is too slow for the round's schedule: what was measured and what it needs,
        # until a swap with them goes through (bounded: one entry per partner of the round history).
        self.slow_links: dict[str, str] = {}
        self.totals: dict[str, float] = {
            "bytes_sent": 0, "bytes_received": 0, "rounds": 0, "swapped": 0, "exchange_seconds": 0.0
        }  # fmt: skip
        self._step_marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=20)

    def set_activity(self, what: str, detail: str) -> None:
        self.activity = Activity(what, detail)

    def error(self, text: str) -> None:
        self.last_error = f"{time.strftime('%H:%M:%S')} {text}"

    def slow_link(self, partner: str, text: str) -> None:
        """Notes that the link to `partner` cannot carry a round in time; `why` says so until it does."""
        self.slow_links.pop(partner, None)  # the latest note last
        self.slow_links[partner] = text
        while len(self.slow_links) > ROUND_HISTORY:
            del self.slow_links[next(iter(self.slow_links))]

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "listening":
            self.address = fields["address"]
        elif kind == "worker":
            self.values.update(
                parameters=fields["parameters"], shard=fields["shard"], corpus=fields["corpus_sha256"]
            )
            self.set_activity("training", "training its first round")
        elif kind == "progress":
            self.values.update(
                round=fields["round"], inner_step=fields["inner_step"], train_loss=fields["train_loss"]
            )
            self._step_marks.append((now, fields["inner_step"]))
            self.losses.append({"kind": "train", **fields})
        elif kind == "eval":
            self.values["eval_loss"] = fields["eval_loss"]
            self.values.setdefault("eval_loss_start", fields["eval_loss"])
            self.losses.append({"kind": "eval", **fields})
        elif kind == "round":
            self._on_round(fields, now)
        elif kind == "done":
            self.set_activity("done", f"finished at round {fields['round']}")

    def _on_round(self, fields: dict[str, Any], now: float) -> None:
        self.rounds.append({"at": time.time(), **fields})
        self.values["round"] = fields["round"]
        if fields.get("inner_step"):
            self.values["inner_step"] = fields["inner_step"]
            self._step_marks.append((now, fields["inner_step"]))
        if fields.get("train_loss") is not None:
            self.values["train_loss"] = fields["train_loss"]
        self.values["last_round_bytes_sent"] = fields["bytes_sent"]
        if fields.get("bits_per_param") is not None:
            self.values["bits_per_param"] = fields["bits_per_param"]
        self.values["last_round_bytes_received"] = fields["bytes_received"]
        self.totals["rounds"] += 1
        self.totals["swapped"] += fields["outcome"] == "swapped"
        self.totals["bytes_sent"] += fields["bytes_sent"]
        self.totals["bytes_received"] += fields["bytes_received"]
        self.totals["exchange_seconds"] += fields.get("seconds") or 0.0
        partner = fields.get("partner")
        if partner:
            link = self.links.setdefault(partner, LinkStats(partner))
            link.exchanges += fields["outcome"] == "swapped"
            link.last_outcome = fields["outcome"]
            link.last_exchange_at = time.time()
            link.last_seconds = fields.get("seconds", 0.0)
            link.last_bytes = fields["bytes_sent"] + fields["bytes_received"]
            if fields["outcome"] == "swapped":
                self.slow_links.pop(partner, None)
        if fields["outcome"] != "swapped":
            self.values["last_skip"] = f"round {fields['round']}: {fields['outcome']}"

    def steps_per_second(self) -> float:
        if len(self._step_marks) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._step_marks[0], self._step_marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def why(self) -> str:
        """Why the peer is idle or slow right now, in one sentence."""
        seconds = time.monotonic() - self.activity.since
        detail = self.activity.detail
        slow = f" Slow link: {next(reversed(self.slow_links.values()))}." if self.slow_links else ""
        if self.activity.what == "waiting":
            return f"Waiting {seconds:.0f}s so far: {detail}.{slow}"
        if self.activity.what == "training":
            rate = self.steps_per_second()
            pace = f" at {rate:.1f} inner steps/s" if rate else ""
            return f"Busy training{pace}: {detail}; the next exchange comes at the end of the round.{slow}"
        return f"{detail[:1].upper()}{detail[1:]} ({seconds:.0f}s).{slow}"

    def snapshot(self) -> dict[str, Any]:
        rounds = self.totals["rounds"]
        return {
            "peer_id": self.peer_id,
            "run": self.run_id,
            "address": self.address,
            "uptime_s": round(time.time() - self.started_at, 1),
            "activity": self.activity.what,
            "why": self.why(),
            "inner_steps_per_s": round(self.steps_per_second(), 2),
            "bytes_sent_per_round": self.totals["bytes_sent"] / rounds if rounds else 0,
            "bytes_received_per_round": self.totals["bytes_received"] / rounds if rounds else 0,
            "rounds_done": rounds,
            "rounds_swapped": self.totals["swapped"],
            "bytes_sent_total": self.totals["bytes_sent"],
            "bytes_received_total": self.totals["bytes_received"],
            "exchange_seconds_total": round(self.totals["exchange_seconds"], 3),
            "partners": len(self.links),
            "last_error": self.last_error,
            **self.values,
        }
