"""`peer swarm`: N real `peer join` processes on 127.0.0.1, a live table, and a summary at the end.

Each peer is a separate `peer join --json-events` process (with its own worker process); the first one
starts the run and the others bootstrap from the address it prints. The swarm reads their event lines,
shows them live, and stops them all cleanly on Ctrl-C (SIGTERM to each, SIGKILL past a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shoal.peer.config import DAEMON_BEHAVIOURS

STOP_GRACE_S = 20.0
START_TIMEOUT_S = 120.0
MAX_REASONS = 8  # distinct guard reasons kept per partner in the summary


@dataclass(frozen=True)
class SwarmOptions:
    peers: int
    run_id: str
    rounds: int
    inner_steps: int
    model: str
    json_path: str | None
    swarm_dir: str | None
    threads: int
    debug: bool = False  # each peer's log (peer-N.log) gets the full traceback of a failure
    behave: dict[int, str] = field(default_factory=dict)  # test only: peer index -> attack it plays


@dataclass
class PeerView:
    index: int
    peer_id: str = ""
    address: str = ""
    round: int = 0
    inner_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_start: float | None = None
    partner: str = ""
    outcome: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds_done: int = 0
    rounds_swapped: int = 0
    parameters: int = 0
    bits_per_param: float | None = None  # of the last payload sent
    state: str = "starting"
    exit_code: int | None = None
    log_path: Path | None = None
    error: str = ""  # the one line a failed peer printed (its `error` event)
    extra: dict[str, Any] = field(default_factory=dict)
    # The guard's verdicts on this peer's partners: peer id -> refusals / clips; peers the run excluded.
    refused: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # peer id -> round this peer learned it
    first_flagged: dict[str, int] = field(default_factory=dict)  # peer id -> first round refused or clipped
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # peer id -> "refuse: why" -> count

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        self.peer_id = event.get("peer", self.peer_id)
        if kind == "listening":
            self.address, self.state = event["address"], "joining"
        elif kind == "worker":
            self.parameters, self.state = event.get("parameters", 0), "training"
        elif kind == "progress":
            self.round, self.inner_step = event["round"], event["inner_step"]
            self.train_loss = event["train_loss"]
        elif kind == "eval":
            self.eval_loss = event["eval_loss"]
            if self.eval_start is None:
                self.eval_start = self.eval_loss
        elif kind == "round":
            self.round, self.rounds_done = event["round"], self.rounds_done + 1
            self.inner_step = event.get("inner_step") or self.inner_step
            self.train_loss = event.get("train_loss", self.train_loss)
            self.partner = event.get("partner") or ""
            self.outcome = event["outcome"]
            self.rounds_swapped += event["outcome"] == "swapped"
            self.bytes_sent += event["bytes_sent"]
            if event.get("bits_per_param") is not None:
                self.bits_per_param = event["bits_per_param"]
            self.bytes_received += event["bytes_received"]
        elif kind == "verdict":
            counts = {"refuse": self.refused, "clip": self.clipped}.get(event.get("action", ""))
            if counts is not None:
                counts[event["peer"]] = counts.get(event["peer"], 0) + 1
                self.first_flagged.setdefault(event["peer"], event.get("round", 0))
                why = self.reasons.setdefault(event["peer"], {})
                reason = f"{event['action']}: {str(event.get('reason'))[:80]}"
                if reason in why or len(why) < MAX_REASONS:
                    why[reason] = why.get(reason, 0) + 1
        elif kind == "excluded":
            self.excluded.setdefault(event["peer"], event.get("round", 0))
        elif kind == "done":
            self.state = "done"
        elif kind == "error":
            self.error = str(event.get("message", ""))
            self.outcome = f"error: {self.error}"


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def live_table(views: list[PeerView], rounds: int) -> Table:
    table = Table(title=f"Shoal swarm: {len(views)} peers, {rounds} rounds", pad_edge=False)
    for column in (
        "peer",
        "state",
        "round",
        "step",
        "train",
        "eval",
        "partner",
        "sent",
        "recv",
        "last round",
    ):
        table.add_column(column, no_wrap=column != "last round")
    for v in views:
        table.add_row(
            f"{v.index}:{v.peer_id[-6:]}",
            v.state,
            f"{v.round}/{rounds}",
            str(v.inner_step),
            _fmt_loss(v.train_loss),
            _fmt_loss(v.eval_loss),
            v.partner[-6:] or "-",
            _fmt_bytes(v.bytes_sent),
            _fmt_bytes(v.bytes_received),
            v.outcome[:40],
        )
    return table


def summarize(views: list[PeerView], options: SwarmOptions, wall_s: float) -> dict[str, Any]:
    starts = [v.eval_start for v in views if v.eval_start is not None]
    ends = [v.eval_loss for v in views if v.eval_loss is not None]
    rounds_done = sum(v.rounds_done for v in views)
    return {
        "peers": options.peers,
        "rounds": options.rounds,
        "eval_loss_start": statistics.mean(starts) if starts else None,
        "eval_loss_end": statistics.mean(ends) if ends else None,
        "bytes_per_peer_per_round": sum(v.bytes_sent for v in views) / rounds_done if rounds_done else 0,
        "bits_per_param": max((v.bits_per_param or 0.0 for v in views), default=0.0),
        "wall_s": round(wall_s, 2),
        "per_peer": [
            {
                "peer": v.peer_id,
                "eval_loss_start": v.eval_start,
                "eval_loss_end": v.eval_loss,
                "rounds_done": v.rounds_done,
                "rounds_swapped": v.rounds_swapped,
                "bytes_sent": v.bytes_sent,
                "bytes_received": v.bytes_received,
                "exit_code": v.exit_code,
                "parameters": v.parameters,
                "bits_per_param": v.bits_per_param,
                "guard": {
                    "refused": v.refused,
                    "clipped": v.clipped,
                    "first_flagged": v.first_flagged,
                    "reasons": v.reasons,
                    "excluded": v.excluded,
                },
            }
            for v in views
        ],
    }


def summary_table(views: list[PeerView], summary: dict[str, Any]) -> Table:
    title = f"Summary: {summary['peers']} peers, {summary['rounds']} rounds, {summary['wall_s']:.1f} s"
    table = Table(title=title)
    for column in (
        "peer",
        "eval start",
        "eval end",
        "change",
        "rounds",
        "swaps",
        "sent/round",
        "bits/param",
        "exit",
    ):
        table.add_column(column, no_wrap=True)
    for v in views:
        per_round = v.bytes_sent / v.rounds_done if v.rounds_done else 0
        table.add_row(
            f"{v.index}:{v.peer_id[-6:]}",
            _fmt_loss(v.eval_start),
            _fmt_loss(v.eval_loss),
            _fmt_change(v.eval_start, v.eval_loss),
            str(v.rounds_done),
            str(v.rounds_swapped),
            _fmt_bytes(per_round),
            "-" if v.bits_per_param is None else f"{v.bits_per_param:.2f}",
            str(v.exit_code),
        )
    table.add_section()
    table.add_row(
        "mean",
        _fmt_loss(summary["eval_loss_start"]),
        _fmt_loss(summary["eval_loss_end"]),
        _fmt_change(summary["eval_loss_start"], summary["eval_loss_end"]),
        str(sum(v.rounds_done for v in views)),
        str(sum(v.rounds_swapped for v in views)),
        _fmt_bytes(summary["bytes_per_peer_per_round"]),
        f"{summary['bits_per_param']:.2f}",
        "",
    )
    return table


def _fmt_change(start: float | None, end: float | None) -> str:
    return f"{100 * (end - start) / start:+.1f}%" if start and end else "-"


class Swarm:
    def __init__(self, options: SwarmOptions, console: Console):
        self.options = options
        self.console = console
        self.dir = Path(options.swarm_dir or Path("runs") / options.run_id)
        self.views = [PeerView(i) for i in range(options.peers)]
        self.processes: list[asyncio.subprocess.Process] = []
        self.stopping = asyncio.Event()

    def command(self, index: int, bootstrap: str | None) -> list[str]:
        o = self.options
        args = [
            sys.executable,
            "-P",
            "-m",
            "shoal.peer",
            "join",
            "--run",
            o.run_id,
            "--listen",
            "127.0.0.1:0",
            "--json-events",
            "--rounds",
            str(o.rounds),
            "--inner-steps",
            str(o.inner_steps),
            "--model",
            o.model,
            "--shard",
            f"{index}/{o.peers}",
            "--wait-peers",
            str(o.peers),
            "--threads",
            str(o.threads),
            "--state-dir",
            str(self.dir / f"peer-{index}"),
        ]
        if o.debug:
            args.append("--debug")
        if index in o.behave:
            args += ["--behave", o.behave[index]]
        return [*args, "--bootstrap", bootstrap] if bootstrap else args

    async def start_peer(self, index: int, bootstrap: str | None) -> asyncio.subprocess.Process:
        view = self.views[index]
        view.log_path = self.dir / f"peer-{index}.log"
        with open(view.log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *self.command(index, bootstrap),
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,  # Ctrl-C reaches the swarm only; it stops the peers itself
            )
        self.processes.append(process)
        return process

    async def follow(
        self, index: int, process: asyncio.subprocess.Process, listening: asyncio.Event | None
    ) -> None:
        view = self.views[index]
        assert process.stdout is not None
        while line := await process.stdout.readline():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            view.apply(event)
            if listening is not None and event.get("event") == "listening":
                listening.set()
        view.exit_code = await process.wait()
        if view.state != "done":
            view.state = "stopped" if self.stopping.is_set() else f"failed ({view.exit_code})"
        if listening is not None:
            listening.set()  # never leave the starter waiting on a peer that died

    async def run(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with Live(
            live_table(self.views, self.options.rounds), console=self.console, refresh_per_second=4
        ) as live:
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._refresh(live))
                    group.create_task(self._watch_stop())
                    listening = asyncio.Event()
                    first = await self.start_peer(0, None)
                    followers = [group.create_task(self.follow(0, first, listening))]
                    async with asyncio.timeout(START_TIMEOUT_S):
                        await listening.wait()
                    if not self.views[0].address:
                        raise RuntimeError(f"the first peer did not start; see {self.views[0].log_path}")
                    for index in range(1, self.options.peers):
                        process = await self.start_peer(index, self.views[0].address)
                        followers.append(group.create_task(self.follow(index, process, None)))
                    # A peer that plays a silent member (test only) stays until the others are done.
                    await asyncio.gather(*(f for i, f in enumerate(followers) if not self._lingers(i)))
                    self.stopping.set()  # ends the refresher and the stop watcher
            finally:
                await self._stop_all()
            live.update(live_table(self.views, self.options.rounds))
        summary = summarize(self.views, self.options, time.monotonic() - started)
        self.console.print(summary_table(self.views, summary))
        if self.options.json_path:
            Path(self.options.json_path).write_text(json.dumps(summary, indent=2))
            self.console.print(f"summary written to {self.options.json_path}")
        self.console.print(f"peer logs and checkpoints: {self.dir}/")
        failed = [v for v in self.views if v.state != "done" and not self._lingers(v.index)]
        for v in failed:
            if v.error:
                self.console.print(f"peer {v.index} failed: {v.error} (log: {v.log_path})", markup=False)
        return 1 if failed else 0

    def _lingers(self, index: int) -> bool:
        return self.options.behave.get(index) in DAEMON_BEHAVIOURS

    async def _refresh(self, live: Live) -> None:
        while not self.stopping.is_set():
            live.update(live_table(self.views, self.options.rounds))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.stopping.wait()

    async def _watch_stop(self) -> None:
        await self.stopping.wait()
        await self._stop_all()

    async def _stop_all(self) -> None:
        """SIGTERM to every peer still running (each stops its worker), SIGKILL past the grace period."""
        self.stopping.set()
        running = [p for p in self.processes if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))


def run_swarm(options: SwarmOptions) -> int:
    import uvloop

    # Piped into a file or a CI log, rich would assume 80 columns and squeeze the tables.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    swarm = Swarm(options, console)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, swarm.stopping.set)
        return await swarm.run()

    return uvloop.run(main())
