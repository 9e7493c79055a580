"""Hostile peers against a live run: do the honest peers keep swapping, and what does each attack cost them?

Issue 16. For every attack (`bench/hostile_attacks.py`) and identity count (1, and 32 on one IP), a fresh
run of 4 honest `peer join` processes on 127.0.0.1 (nano model, 4 inner steps: rounds of a fraction of a
second, `--json-events` on stdout; product defaults otherwise) is started and measured for two equally
long windows:

1. **baseline** (`--seconds`): the honest peers' swaps, and a fresh honest peer started at the window's start
   (bootstrapping through the attacked peer, as a newcomer would) until its first swap;
2. **attack** (`--seconds`): the same, while the attacker process, its sockets bound to 127.0.1.1 (another
   /24 than the honest peers'), attacks the run's first peer (the bootstrap peer);

then `AFTER_S` = 10 s more without the attack, for memory that should be given back. The attacker stops by
itself at the window's end; every process is stopped (SIGTERM, then SIGKILL after 20 s, the workers too).

Per attack and identity count (printed as a table, written to `--json`):

- `honest_swap_ratio`: rounds the 4 honest peers swapped with each other during the attack / during the
  baseline (the newcomer's rounds are left out of both: while its model loads it refuses offers, and how
  long that takes on a shared machine would otherwise move the ratio; `all_swaps_*` count them too). On a
  shared machine the swap rate drifts with the other load: `honest_swap_share_ratio` (the share of rounds
  swapped, attack over baseline: "share" in the table) does not move when every round just gets slower;
  `baseline_half_ratio` (the baseline's second half over its first) shows how uneven a window is (the
  first half holds the newcomer's start: its model load takes CPU, its partners' rounds are refused);
- `new_peer_join_s` / `new_peer_join_baseline_s`: the fresh peer's time from process start to its first
  swap (null: it did not swap by the end of the 10 s after the attack);
- `daemon_rss_growth_mb`: max over the honest daemons (not their workers) of their peak VmRSS during the
  attack minus their VmRSS just before it; `rss_after_mb_minus_before`: the same 10 s after the attack;
- `log_lines_per_s`: lines the honest peers wrote to stderr during the attack, and until 1 s after the
  attacker's process exited (its connections closing are its doing), / seconds; the target applies
  to `log_lines_per_s_excess`, that rate minus the baseline's (the newcomer's join and leave log a few
  lines in both windows; `log_lines_during_attack` lists the commonest kinds);
- `forged_state_changes`: (observer, subject) pairs of honest peers in which the observer's membership
  table (`peers` on its control socket, polled every 2 s) showed the live subject as `left`, or with
  addresses the subject does not publish: what only the subject may say, said by someone else;
  `honest_peers_lost` counts any loss of a live honest peer from another's live view (also a `peer_lost`
  event), forged or caused by a peer too slow to gossip.

The final line checks each against the issue's targets: swap ratio >= 0.9, join <= 1.5 x baseline + 2 s,
RSS growth <= 64 MB and back within 16 MB after, <= 1 log line per second, no forged state change.

    python -m bench.hostile --json bench/out/hostile.json [--attacks memory,log_flood] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hostile_attacks import ATTACKS, EXTRA_ATTACKS, RAW_ATTACKS
from shoal.peer.control import SOCKET_NAME, ControlClient
from shoal.transport.multiaddr import Multiaddr

REPO = Path(__file__).resolve().parents[1]
HONEST_PEERS = 4
HONEST_IP = "127.0.0.1"
START_TIMEOUT_S = 300
STOP_GRACE_S = 20.0
AFTER_S = 10.0  # without the attack, before the memory is read again
ATTACKER_LEAD_S = 4.0  # the attacker's process starts this long before its window, outside both windows
TEARDOWN_LOG_S = 1.0  # after the attacker exits: its teardown's log lines count as the attack's
SETTLE_S = 3.0  # after every honest peer swapped once, before the baseline
SAMPLE_S = 1.0  # the honest daemons' RSS, the victim's CPU time
POLL_S = 2.0  # control-socket polls of every honest peer's membership table
TARGETS = {
    "swap": "honest_swap_ratio >= 0.9",
    "join": "new_peer_join_s <= 1.5 x baseline + 2 s",
    "rss": "daemon_rss_growth_mb <= 64 and rss_after_mb_minus_before <= 16",
    "log": "log_lines_per_s_excess <= 1 (the attack window's rate minus the baseline's)",
    "forged": "forged_state_changes == 0",
}
PEER_ARGS = ["--model", "nano", "--inner-steps", "4", "--batch-size", "4", "--threads", "1",
             "--rounds", "1000000", "--listen", f"{HONEST_IP}:0"]  # fmt: skip


class Proc:
    """A child process we started, and the processes it started (its worker), stopped together."""

    def __init__(self, name: str, argv: list[str], stdout: Path, stderr: Path):
        self.name = name
        self.stdout_path, self.stderr_path = stdout, stderr
        self.started = time.time()
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, env=dict(os.environ))
        self.pid = self.process.pid
        self.descendants: set[int] = set()

    def running(self) -> bool:
        return self.process.poll() is None

    def note_descendants(self) -> None:
        """Remembers its children while it lives: once it is gone, they can no longer be found from it."""
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            try:
                children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            self.descendants.update(children)
            todo += children

    def terminate(self) -> None:
        self.note_descendants()
        if self.running():
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; then the same for what it left behind."""
        self.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.running():
            self.process.kill()
        self.process.wait(timeout=30)
        leftovers = [pid for pid in self.descendants if _ours(pid)]
        deadline = time.monotonic() + STOP_GRACE_S
        while leftovers and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            leftovers = [pid for pid in leftovers if _ours(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ours(pid: int) -> bool:
    """Whether `pid` still runs as one of our Shoal processes (a pid may be reused once it exits)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"shoal" in command and status.rsplit(")", 1)[1].split()[0] != "Z"


class Peer(Proc):
    """A `peer join --json-events` process: its events (read as they come), stderr lines, memory."""

    def __init__(self, name: str, folder: Path, args: list[str]):
        self.state_dir = folder / name
        argv = [sys.executable, "-P", "-m", "shoal.peer", "join", "--json-events", *args,
                "--state-dir", str(self.state_dir)]  # fmt: skip
        super().__init__(name, argv, folder / f"{name}.jsonl", folder / f"{name}.log")
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self.address: str | None = None
        self.peer_id: str | None = None
        self.first_swap: float | None = None  # wall clock of the first swapped round
        self.control: ControlClient | None = None

    def read(self) -> None:
        """New complete event lines since the last read."""
        with open(self.stdout_path, "rb") as file:
            file.seek(self._offset)
            data = file.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            if event.get("event") == "listening" and self.address is None:
                self.address = str(event["address"])
                self.peer_id = str(event["peer"])
            if (
                event.get("event") == "round"
                and event.get("outcome") == "swapped"
                and self.first_swap is None
            ):
                self.first_swap = float(event["t"])

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def cpu_s(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def swaps(self, start: float, end: float, partners: set[str] | None = None) -> int:
        """Swapped rounds in a window (with one of `partners`, when given)."""
        return sum(
            1
            for e in self.events
            if e.get("event") == "round"
            and e.get("outcome") == "swapped"
            and start <= float(e["t"]) < end
            and (partners is None or e.get("partner") in partners)
        )

    def rounds(self, start: float, end: float) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "round" and start <= float(e["t"]) < end]

    async def peers(self) -> list[dict[str, Any]] | None:
        """This peer's membership table from its control socket; None if it does not answer in time."""
        try:
            if self.control is None:
                self.control = await ControlClient.connect(self.state_dir / SOCKET_NAME, timeout=2.0)
            return list(await self.control.call("peers", timeout=3.0))
        except Exception:
            await self.close_control()
            return None

    async def close_control(self) -> None:
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.close()
            self.control = None

    async def stop(self) -> None:
        await self.close_control()
        await super().stop()
        self.read()


@dataclass
class Samples:
    """What the monitor saw: memory per daemon, log lines per peer, membership tables per observer."""

    rss: list[tuple[float, str, float]] = field(default_factory=list)
    tables: list[tuple[float, str, list[dict[str, Any]]]] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (time, the victim daemon's CPU seconds)


class Trial:
    """One attack with one identity count against a fresh run of honest peers."""

    def __init__(self, options: argparse.Namespace, folder: Path, attack: str, identities: int):
        self.options, self.attack, self.identities = options, attack, identities
        self.folder = folder / f"{attack}-{identities}"
        self.folder.mkdir(parents=True)
        self.run_id = f"hostile-{attack.replace('_', '-')[:20]}-{identities}-{secrets.token_hex(3)}"
        self.honest: list[Peer] = []
        self.joiners: list[Peer] = []
        self.attacker: Proc | None = None
        self.samples = Samples()
        self.log_offsets: dict[float, list[int]] = {}  # window edge -> size of each honest stderr file
        self._stop_monitor = asyncio.Event()

    # ---------------------------------------------------------------- processes

    def _peer(self, name: str, extra: list[str]) -> Peer:
        return Peer(name, self.folder, ["--run", self.run_id, *PEER_ARGS, *extra])

    async def start_run(self) -> None:
        first = self._peer("p0", ["--wait-peers", str(HONEST_PEERS)])
        self.honest.append(first)
        deadline = time.monotonic() + START_TIMEOUT_S
        while first.address is None:
            first.read()
            if time.monotonic() > deadline or not first.running():
                raise SystemExit(f"the first peer did not start; see {first.stderr_path}")
            await asyncio.sleep(0.2)
        for i in range(1, HONEST_PEERS):
            peer = self._peer(f"p{i}", ["--wait-peers", str(HONEST_PEERS), "--bootstrap", first.address])
            self.honest.append(peer)
        while not all(p.first_swap for p in self.honest):
            for peer in self.honest:
                peer.read()
                if not peer.running():
                    raise SystemExit(f"honest peer {peer.name} exited; see {peer.stderr_path}")
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"not every honest peer swapped within {START_TIMEOUT_S} s; see {self.folder}"
                )
            await asyncio.sleep(0.5)
        for peer in self.honest:
            peer.note_descendants()

    def start_joiner(self) -> Peer:
        assert self.honest[0].address is not None
        joiner = self._peer(
            f"j{len(self.joiners)}", ["--wait-peers", "1", "--bootstrap", self.honest[0].address]
        )
        self.joiners.append(joiner)
        return joiner

    def start_attacker(self, start: float, deadline: float) -> Proc:
        members = [p.address for p in self.honest]
        subject = self.honest[1].peer_id
        assert all(members) and subject is not None
        argv = [sys.executable, "-m", "bench.hostile_attacks", "--attack", self.attack,
                "--identities", str(self.identities), "--start", f"{start:.3f}",
                "--deadline", f"{deadline:.3f}", "--run", self.run_id, "--subject", subject,
                "--bind", self.options.attacker_ip,
                "--json-out", str(self.folder / "attacker.json")]  # fmt: skip
        for member in members:
            argv += ["--member", str(member)]
        self.attacker = Proc("attacker", argv, self.folder / "attacker.out", self.folder / "attacker.err")
        return self.attacker

    async def stop_all(self) -> None:
        procs: list[Proc] = [*self.honest, *self.joiners]
        if self.attacker is not None:
            procs.append(self.attacker)
        for proc in procs:
            proc.terminate()
        await asyncio.gather(*(p.stop() for p in procs))

    # ---------------------------------------------------------------- watching

    async def monitor(self) -> None:
        """Memory and the victim's CPU every SAMPLE_S; the membership tables in a task of their own (a
        control socket may answer slowly under attack)."""
        polls = asyncio.create_task(self.poll_tables())
        try:
            await self.sample()
        finally:
            polls.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polls

    async def poll_tables(self) -> None:
        while True:
            started = time.time()
            tables = await asyncio.gather(*(p.peers() for p in self.honest))
            for peer, table in zip(self.honest, tables, strict=True):
                if table is not None:
                    self.samples.tables.append((time.time(), peer.name, table))
            await asyncio.sleep(max(0.1, POLL_S - (time.time() - started)))

    async def sample(self) -> None:
        victim = self.honest[0]
        while not self._stop_monitor.is_set():
            now = time.time()
            for peer in self.honest:
                rss = peer.rss_mb()
                if rss is not None:
                    self.samples.rss.append((now, peer.name, rss))
                peer.note_descendants()
            for joiner in self.joiners:
                joiner.note_descendants()
            cpu = victim.cpu_s()
            if cpu is not None:
                self.samples.cpu.append((now, cpu))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, SAMPLE_S - (time.time() - now))):
                    await self._stop_monitor.wait()

    def read_all(self) -> None:
        for peer in [*self.honest, *self.joiners]:
            peer.read()

    async def window(self, seconds: float, attack: bool) -> tuple[float, float, Peer]:
        """One measured window: a fresh peer joins at its start (and is stopped once it swapped); the
        attacker, if any, runs from its start to its end (its process starts ATTACKER_LEAD_S before, to
        load Python and make its identities outside the window)."""
        start = time.time()
        if attack:
            start += ATTACKER_LEAD_S
            self.start_attacker(start, start + seconds)
            while time.time() < start:
                self.read_all()
                await asyncio.sleep(0.1)
        end = start + seconds
        self.note_log_offsets(start)
        joiner = self.start_joiner()
        while time.time() < end:
            self.read_all()
            if joiner.first_swap is not None and joiner.running():
                joiner.terminate()  # a clean leave; stop() reaps it at the end
            await asyncio.sleep(0.25)
        self.note_log_offsets(end)
        return start, end, joiner

    def note_log_offsets(self, at: float) -> None:
        self.log_offsets[at] = [p.stderr_path.stat().st_size for p in self.honest]

    # ---------------------------------------------------------------- one trial

    async def run(self) -> dict[str, Any]:
        seconds = self.options.seconds
        monitor: asyncio.Task[None] | None = None
        try:
            await self.start_run()
            await asyncio.sleep(SETTLE_S)
            monitor = asyncio.create_task(self.monitor())
            await asyncio.sleep(SAMPLE_S)
            b0, b1, base_joiner = await self.window(seconds, attack=False)
            a0, a1, joiner = await self.window(seconds, attack=True)
            # The attacker stops itself at a1; it gets STOP_GRACE_S to close everything before it is stopped.
            assert self.attacker is not None
            grace = time.monotonic() + STOP_GRACE_S
            while self.attacker.running() and time.monotonic() < grace:
                await asyncio.sleep(0.2)
            attacker_stopped_by_itself = not self.attacker.running()
            await self.attacker.stop()
            # The lines the attacker's teardown makes (its connections and streams closing) are its own.
            await asyncio.sleep(TEARDOWN_LOG_S)
            logs_end = time.time()
            self.note_log_offsets(logs_end)
            after_at = max(time.time(), a1) + AFTER_S
            while time.time() < after_at:
                self.read_all()
                if joiner.first_swap is not None and joiner.running():
                    joiner.terminate()
                await asyncio.sleep(0.25)
            self._stop_monitor.set()
            await monitor
            monitor = None
            self.read_all()
            return self.summarize(
                b0, b1, a0, a1, logs_end, after_at, base_joiner, joiner, attacker_stopped_by_itself
            )
        finally:
            self._stop_monitor.set()
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            await self.stop_all()

    def summarize(
        self, b0: float, b1: float, a0: float, a1: float, logs_end: float, after_at: float,
        base_joiner: Peer, joiner: Peer, attacker_stopped_by_itself: bool,
    ) -> dict[str, Any]:  # fmt: skip
        seconds = a1 - a0
        # Swaps between the 4 honest peers: the newcomer's rounds (refused while its model loads) are left
        # out of both windows, so that how long it takes to load does not move the ratio.
        honest_ids = {p.peer_id for p in self.honest if p.peer_id}
        base_swaps = sum(p.swaps(b0, b1, honest_ids) for p in self.honest)
        attack_swaps = sum(p.swaps(a0, a1, honest_ids) for p in self.honest)
        middle = (b0 + b1) / 2
        first_half = sum(p.swaps(b0, middle, honest_ids) for p in self.honest)
        second_half = sum(p.swaps(middle, b1, honest_ids) for p in self.honest)
        base_share, attack_share = self.swap_share(b0, b1), self.swap_share(a0, a1)
        base_join = _join_time(base_joiner)
        join = _join_time(joiner)
        names = [p.name for p in self.honest]
        before = {n: _last(self.samples.rss, n, b0, a0) for n in names}
        peak = {n: _peak(self.samples.rss, n, a0, logs_end) for n in names}
        after = {n: _last(self.samples.rss, n, a1, after_at + 1) for n in names}
        growth = {n: _minus(peak[n], before[n]) for n in names}
        left_over = {n: _minus(after[n], before[n]) for n in names}
        log_base, _ = self.log_lines(b0, b1)
        log_attack, log_kinds = self.log_lines(a0, logs_end)
        forged_base, lost_base = self.membership_changes(b0, b1)
        forged, lost = self.membership_changes(a0, after_at)
        attacker = _read_json(self.folder / "attacker.json")
        skips = collections.Counter(
            _shape(r["outcome"]) for p in self.honest for r in p.rounds(a0, a1) if r["outcome"] != "swapped"
        )
        result: dict[str, Any] = {
            "identities": self.identities,
            "identities_apply": self.attack not in RAW_ATTACKS,
            "attacker_ip": ",".join(attacker.get("source_ips_seen") or [self.options.attacker_ip]),
            "honest_swap_ratio": round(attack_swaps / base_swaps, 3) if base_swaps else None,
            "honest_swaps_baseline": base_swaps,
            "honest_swaps_attack": attack_swaps,
            # How uneven a window is without any attack: the baseline's second half over its first (the first
            # holds the newcomer's start).
            "baseline_half_ratio": round(second_half / first_half, 3) if first_half else None,
            "honest_swap_share_baseline": base_share,
            "honest_swap_share_attack": attack_share,
            "honest_swap_share_ratio": round(attack_share / base_share, 3)
            if base_share and attack_share is not None
            else None,
            "all_swaps_baseline": sum(p.swaps(b0, b1) for p in self.honest),
            "all_swaps_attack": sum(p.swaps(a0, a1) for p in self.honest),
            "new_peer_join_s": join,
            "new_peer_join_baseline_s": base_join,
            "daemon_rss_growth_mb": _max(growth.values()),
            "rss_after_mb_minus_before": _max(left_over.values()),
            "victim_rss_before_mb": _round(before[names[0]]),
            "victim_rss_peak_mb": _round(peak[names[0]]),
            "log_lines_per_s": round(log_attack / seconds, 2),
            "log_lines_per_s_baseline": round(log_base / seconds, 2),
            "log_lines_per_s_excess": round((log_attack - log_base) / seconds, 2),
            "log_lines_during_attack": log_kinds,
            "forged_state_changes": len(forged),
            "forged_state_changes_baseline": len(forged_base),
            "honest_peers_lost": len(lost),
            "honest_peers_lost_baseline": len(lost_base),
            "foreign_live_members_max": self.foreign_members(a0, after_at),
            "victim_cpu_per_s": _rate(self.samples.cpu, a0, a1),
            "victim_cpu_per_s_baseline": _rate(self.samples.cpu, b0, b1),
            "skips_during_attack": dict(skips.most_common(5)),
            "attacker_stopped_by_itself": attacker_stopped_by_itself,
            "attacker": attacker,
            "windows": {
                "baseline": [round(b0, 3), round(b1, 3)],
                "attack": [round(a0, 3), round(a1, 3)],
                "logs_end": round(logs_end, 3),
                "after": round(after_at, 3),
            },
            "logs": str(self.folder),
        }
        if "bytes_served_to_stranger" in attacker:
            result["bytes_served_to_stranger"] = int(attacker.get("bytes_served_to_stranger", 0))
        result["checks"] = checks(result)
        return result

    def membership_changes(
        self, start: float, end: float
    ) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """(observer, subject) pairs of honest peers, both up, in which the observer's table held something
        about the subject that only the subject may say (forged), or lost it from its live view (lost)."""
        by_id = {p.peer_id: p for p in self.honest}
        own_addrs: dict[str, set[str]] = collections.defaultdict(set)
        for _, _, table in self.samples.tables:
            for entry in table:
                if entry.get("self"):
                    own_addrs[entry["peer_id"]].update(entry.get("addresses") or [])
        forged: set[tuple[str, str]] = set()
        lost: set[tuple[str, str]] = set()
        for t, observer, table in self.samples.tables:
            if not start <= t < end:
                continue
            seen = {e["peer_id"]: e for e in table}
            for subject_id, subject in by_id.items():
                if subject.name == observer or subject_id is None or not subject.running():
                    continue
                held = seen.get(subject_id)
                if held is None or not held.get("live"):
                    lost.add((observer, subject.name))
                if held is not None and (
                    held.get("left") or not set(held.get("addresses") or []) <= own_addrs[subject_id]
                ):
                    forged.add((observer, subject.name))
        for watcher in self.honest:
            for event in watcher.events:
                gone = by_id.get(event.get("partner"))
                if (
                    event.get("event") == "peer_lost"
                    and gone is not None
                    and start <= float(event["t"]) < end
                ):
                    lost.add((watcher.name, gone.name))
        return forged, lost

    def swap_share(self, start: float, end: float) -> float | None:
        """The share of the honest peers' rounds that they swapped with each other, among the rounds not
        paired with the newcomer: unlike the swap count, it does not fall when a busy machine makes every
        round slower, only when rounds are skipped."""
        honest_ids = {p.peer_id for p in self.honest}
        joiner_ids = {p.peer_id for p in self.joiners}
        rounds = [r for p in self.honest for r in p.rounds(start, end) if r.get("partner") not in joiner_ids]
        swapped = sum(1 for r in rounds if r["outcome"] == "swapped" and r.get("partner") in honest_ids)
        return round(swapped / len(rounds), 3) if rounds else None

    def log_lines(self, start: float, end: float) -> tuple[int, dict[str, int]]:
        """Lines the honest peers wrote to stderr between two noted offsets, and the commonest kinds
        (numbers, ids and addresses blanked out)."""
        counts: collections.Counter[str] = collections.Counter()
        for peer, first, last in zip(
            self.honest, self.log_offsets[start], self.log_offsets[end], strict=True
        ):
            with open(peer.stderr_path, "rb") as file:
                file.seek(first)
                text = file.read(last - first).decode(errors="replace")
            for line in text.splitlines():
                line = re.sub(r"^[\d-]+ [\d:,]+ ", "", line)
                counts[re.sub(r"\d+", "N", re.sub(r"12D3\w+|\b\w{8}@", "PEER", line))[:120]] += 1
        return sum(counts.values()), dict(counts.most_common(6))

    def foreign_members(self, start: float, end: float) -> int:
        """The most live members one honest peer listed that are neither honest peers nor our joiners."""
        ours = {p.peer_id for p in [*self.honest, *self.joiners]}
        counts = [
            sum(1 for e in table if e.get("live") and e["peer_id"] not in ours)
            for t, _, table in self.samples.tables
            if start <= t < end
        ]
        return max(counts, default=0)


def _join_time(joiner: Peer) -> float | None:
    return round(joiner.first_swap - joiner.started, 1) if joiner.first_swap is not None else None


def _last(samples: list[tuple[float, str, float]], name: str, start: float, end: float) -> float | None:
    values = [v for t, n, v in samples if n == name and start <= t < end]
    return values[-1] if values else None


def _peak(samples: list[tuple[float, str, float]], name: str, start: float, end: float) -> float | None:
    return max((v for t, n, v in samples if n == name and start <= t < end), default=None)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _max(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(max(present), 1) if present else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _rate(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    inside = [(t, v) for t, v in samples if start <= t <= end + SAMPLE_S / 2]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 3)


def _shape(outcome: str) -> str:
    """A skip reason without its numbers and peer ids, so that like reasons count together."""
    return re.sub(r"\d+", "N", re.sub(r"12D3\w+", "PEER", outcome))[:90]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"outcome": f"no result: {path} was not written"}


def failed_trial(identities: int, why: str) -> dict[str, Any]:
    """A trial that could not measure (the honest run did not start): every target counts as failed."""
    result: dict[str, Any] = {
        "identities": identities, "error": why, "honest_swap_ratio": None, "new_peer_join_s": None,
        "new_peer_join_baseline_s": None, "daemon_rss_growth_mb": None, "rss_after_mb_minus_before": None,
        "log_lines_per_s": None, "log_lines_per_s_excess": None, "forged_state_changes": None,
        "honest_peers_lost": None, "victim_cpu_per_s": None,
    }  # fmt: skip
    result["checks"] = {name: False for name in TARGETS}
    return result


def checks(r: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, one verdict each."""
    ratio, join, base = r["honest_swap_ratio"], r["new_peer_join_s"], r["new_peer_join_baseline_s"]
    growth, after, logs = (
        r["daemon_rss_growth_mb"],
        r["rss_after_mb_minus_before"],
        r["log_lines_per_s_excess"],
    )
    return {
        "swap": ratio is not None and ratio >= 0.9,
        "join": join is not None and base is not None and join <= 1.5 * base + 2,
        "rss": growth is not None and after is not None and growth <= 64 and after <= 16,
        "log": logs is not None and logs <= 1,
        "forged": r["forged_state_changes"] == 0,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    head = (f"{'attack':<21} {'ids':>3} {'swap':>5} {'share':>5} {'join s':>6} {'base':>5} {'rss+MB':>6} "
            f"{'after':>6} {'log/s':>6} {'+log/s':>6} {'forged':>6} {'lost':>4} {'cpu/s':>5}  "
            "failed")  # fmt: skip
    lines = [head, "-" * len(head)]
    for attack, rows in results.items():
        for r in rows:
            failed = [name for name, ok in r["checks"].items() if not ok]
            extra = (
                f" served {r['bytes_served_to_stranger'] / 1e6:.0f} MB"
                if "bytes_served_to_stranger" in r
                else ""
            )
            lines.append(
                f"{attack:<21} {r['identities']:>3} {_fmt(r['honest_swap_ratio'], 2):>5} "
                f"{_fmt(r.get('honest_swap_share_ratio'), 2):>5} "
                f"{_fmt(r['new_peer_join_s']):>6} {_fmt(r['new_peer_join_baseline_s']):>5} "
                f"{_fmt(r['daemon_rss_growth_mb']):>6} {_fmt(r['rss_after_mb_minus_before']):>6} "
                f"{_fmt(r['log_lines_per_s']):>6} {_fmt(r['log_lines_per_s_excess']):>6} "
                f"{_fmt(r['forged_state_changes']):>6} "
                f"{_fmt(r['honest_peers_lost']):>4} "
                f"{_fmt(r['victim_cpu_per_s'], 2):>5}  {','.join(failed) or 'none'}{extra}"
            )
    return "\n".join(lines)


def verdicts(results: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for attack, rows in results.items():
        for r in rows:
            failed = [name for name, ok in r["checks"].items() if not ok]
            parts.append(
                f"{attack}/{r['identities']}: " + ("PASS" if not failed else "FAIL(" + ",".join(failed) + ")")
            )
    return "targets: " + "; ".join(parts)


async def run(options: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="shoal-hostile-"))
    print(f"logs in {folder}", flush=True)
    started = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {
        "seconds": options.seconds,
        "honest_peers": HONEST_PEERS,
        "honest_ip": HONEST_IP,
        "attacker_ip": options.attacker_ip,
        "peer_args": PEER_ARGS,
        "after_s": AFTER_S,
        "targets": TARGETS,
        "results": results,
        "logs": str(folder),
    }
    for attack in options.attacks:
        for identities in options.identities:
            trial_started = time.time()
            try:
                result = await Trial(options, folder, attack, identities).run()
            except (Exception, SystemExit) as error:  # one broken trial does not end the benchmark
                result = failed_trial(identities, f"{type(error).__name__}: {error}")
            result["trial_s"] = round(time.time() - trial_started, 1)
            results.setdefault(attack, []).append(result)
            print(table({attack: [result]}).splitlines()[-1], flush=True)
            if options.json:  # what is done so far survives an interrupted run
                report["wall_s"] = round(time.time() - started, 1)
                _write(options.json, report)
    report["wall_s"] = round(time.time() - started, 1)
    report["verdicts"] = verdicts(results)
    return report


def _write(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {**ATTACKS, **EXTRA_ATTACKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attacks {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return names


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,32, got {text!r}") from error
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("identity counts must be at least 1")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here (also after each trial)")
    parser.add_argument(
        "--attacks", type=_names, default=list(ATTACKS), help="comma-separated; default the issue's 10"
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="length of the baseline and attack windows"
    )
    parser.add_argument("--identities", type=_counts, default=[1, 32], help="comma-separated identity counts")
    parser.add_argument("--attacker-ip", default="127.0.1.1", help="the attacker's source address (in 127/8)")
    options = parser.parse_args()
    try:
        Multiaddr.from_tcp(options.attacker_ip, 1)
    except Exception as error:
        parser.error(f"--attacker-ip {options.attacker_ip!r}: {error}")
    report = asyncio.run(run(options))
    print()
    print(table(report["results"]))
    print(report["verdicts"])
    if options.json:
        _write(options.json, report)


if __name__ == "__main__":
    main()
