"""Membership at scale (issue 16): bytes, CPU and detection times of signed membership at 1,000-10,000 peers.

    python -m bench.membership_scale --peers 1000 [--peers 10000] [--seconds 60] --json PATH

Two protocols, one scenario each: N peers in steady state; at `--event-at` s a new member joins through
one bootstrap peer, a member leaves (signs left=True, tells 3 members, stops, as peer/daemon.py `_leave`
does) and another crashes silently; 1 % of messages are lost. Reported: bytes sent + received per peer
per minute over the whole window (msgpack payload as the daemon frames it, without Noise/yamux/TCP
overhead), CPU per peer, and the time until 99 % of the running peers know the joiner, consider the
leaver gone, and consider the crashed member gone.

- "all-to-all signed heartbeats" (gossip/membership.py as the daemon runs it): every 1 s +-20 % a peer
  beats and swaps whole tables with one random live member. Python cannot sign and verify for 10,000 real
  peers in one process, so the *dynamics* (which heartbeat of whom each peer holds and since when: exactly
  what merge() keeps) run for all N peers in NumPy, and `--observers` peers run the real Membership
  objects beside them: real keys, signatures, msgpack and merge() on the same exchanges, their tables
  built from their partners' rows with entries signed by the real subjects' keys. Bytes are exact for
  every peer (sizes of real encoded entries); CPU is measured on the observers and also extrapolated for
  all from the real per-operation costs times the counted operations. Both are printed.
- "SWIM + signed entries + digest sync" (gossip/scalable_membership.py, bench/membership_scale_swim.py):
  every peer is a real object (one shared start table, copy-on-write, so that 10,000 fit in memory).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from shoal.gossip import membership as membership_module
from shoal.gossip.membership import Membership, MembershipEntry
from shoal.transport.identity import generate_key, peer_id_from_key

WALL_CLOCK_GUARD_S = 1500
TARGET_KB_S = 20.0
RUN = "bench-run"
WALL0 = 1_800_000_000.0
PROTOCOL_VERSION = 2  # peer/daemon.py
# What `members` messages carry beside the table (peer/daemon.py `_message`): typical run settings.
SETTINGS = {"model": "tiny", "method": "default", "inner_steps": 20, "lr": 0.0003, "warmup_steps": 100,
            "weight_decay": 0.1, "corpus_sha256": "9f" * 32}  # fmt: skip
FAIL_AFTER = 5.0
DAEMON_MESSAGE_LIMIT = 1 << 20  # peer/round_swap.py CONTROL_MESSAGE_LIMIT


def addrs_of(i: int, peer_id: str) -> list[str]:
    """A public address, and for one peer in three a relayed one too (peer/reach.py publishes both)."""
    direct = f"/ip4/{20 + i // 65025}.{(i // 255) % 255}.{i % 255}.7/tcp/4001/p2p/{peer_id}"
    if i % 3:
        return [direct]
    relay = "12D3KooWRe1ayRe1ayRe1ayRe1ayRe1ayRe1ayRe1ayRe1ayRe1a"
    return [direct, f"/ip4/198.51.100.{i % 200}/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{peer_id}"]


def envelope(peer_id: str, answer: bool, **fields: Any) -> dict[str, Any]:
    extra = {"creator": peer_id, "admission": "open"} if answer else {}
    return {"v": PROTOCOL_VERSION, "type": "members", "run": RUN, "from": peer_id, "settings": SETTINGS,
            **extra, **fields}  # fmt: skip


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def measure_costs(n: int = 200) -> dict[str, float]:
    """Real per-operation costs on this machine (process CPU time): sign, merge of a new entry (parse +
    verify), merge of an entry we already hold, msgpack per byte."""
    wall = lambda: WALL0  # noqa: E731
    members = [Membership(generate_key(), RUN, addrs_of(i, "x"), 0.0, wall_clock=wall) for i in range(n)]
    t = time.process_time()
    tables = [m.table() for m in members]
    sign = (time.process_time() - t) / n
    table = [e for tb in tables for e in tb]
    fresh = Membership(generate_key(), RUN, "/ip4/1.2.3.4/tcp/1", 0.0, wall_clock=wall)
    t = time.process_time()
    for start in range(0, n, 50):  # within merge()'s signature budget per table (2 per member + 64)
        fresh.merge(table[start : start + 50], 1.0)
    new = (time.process_time() - t) / n
    assert len(fresh.members) == n + 1, fresh.refused
    t = time.process_time()
    for _ in range(20):
        fresh.merge(table, 1.0)
    old = (time.process_time() - t) / (20 * n)
    packed = msgpack.packb(envelope(fresh.peer_id, False, table=fresh.table()))
    t = time.process_time()
    for _ in range(20):
        msgpack.unpackb(msgpack.packb(envelope(fresh.peer_id, False, table=fresh.table())))
    codec = (time.process_time() - t) / (20 * len(packed))
    return {"sign_s": sign, "merge_new_entry_s": new, "merge_held_entry_s": old, "codec_s_per_byte": codec}


@dataclass
class Events:
    """When the scenario's events happen and what each peer makes of them (first time 99 % agree)."""

    at: float
    join: float = math.nan
    leave: float = math.nan
    crash: float = math.nan
    agreement: list[float] = field(default_factory=list)

    def note(self, name: str, share: float, now: float) -> None:
        if share >= 0.99 and math.isnan(getattr(self, name)):
            setattr(self, name, round(now - self.at, 2))


class AllToAll:
    """The daemon's gossip loop over all N peers: dynamics in NumPy, real Membership objects on observers."""

    def __init__(self, peers: int, seconds: float, event_at: float, loss: float, observers: int, seed: int):
        self.n, self.m = peers, peers + 1  # the joiner is row/column n
        self.seconds, self.loss = seconds, loss
        self.rng = random.Random(seed)
        self.keys = [generate_key() for _ in range(self.m)]
        self.ids = [str(peer_id_from_key(k)) for k in self.keys]
        self.addrs = [addrs_of(i, pid) for i, pid in enumerate(self.ids)]
        self.inc = [int(WALL0 * 1000) - 10**6 + i for i in range(self.m)]  # incarnations (restart-safe)
        self.joiner, self.leaver, self.crasher = peers, peers - 1, peers - 2
        self.events = Events(event_at)
        self.left_hb = 1 << 15
        self.hb = np.ones(self.m, dtype=np.int64)  # each peer's own heartbeat, relative (1 = start)
        # H[i, j]: j's heartbeat as i holds it (0: unknown); C[i, j]: when it last grew, by i's clock.
        self.H = np.ones((self.m, self.m), dtype=np.uint16)
        self.C = np.zeros((self.m, self.m), dtype=np.float32)
        self.H[self.joiner, :] = 0
        self.H[:, self.joiner] = 0
        self.H[self.joiner, self.joiner] = 1
        self.running = np.ones(self.m, dtype=bool)
        self.running[self.joiner] = False
        self.beats: list[list[float]] = [[0.0] for _ in range(self.m)]  # when each heartbeat was signed
        self._cache: list[dict[int, dict[str, Any]]] = [{} for _ in range(self.m)]
        self.entry_bytes = np.array([len(msgpack.packb(self._wire(j, 1))) for j in range(self.m)], float)
        self.entry_bytes += 8  # heartbeats and timestamps grow into longer msgpack ints: a generous bound
        self.row_bytes = (self.H > 0).astype(float) @ self.entry_bytes  # table sizes, kept as they grow
        self.env_bytes = (len(msgpack.packb(envelope(self.ids[0], False, table=[]))), 0)
        self.env_bytes = (self.env_bytes[0], len(msgpack.packb(envelope(self.ids[0], True, table=[]))))
        self.sent = np.zeros(self.m)
        self.received = np.zeros(self.m)
        self.verifies = np.zeros(self.m)
        self.held = np.zeros(self.m)  # entries merge() looked at and already held
        self.messages = np.zeros(self.m)
        self.signs = np.zeros(self.m)
        self.observers: dict[int, Membership] = {}
        self.observer_cpu: dict[int, float] = {}
        self.mismatches = 0
        self.refused: Counter[str] = Counter()  # what the observers' merge() refused, by reason
        self._start_observers(observers)

    # --- real entries -----------------------------------------------------------------------------
    def _wire(self, j: int, h: int) -> dict[str, Any]:
        """Subject j's entry at relative heartbeat h, signed by j's real key when it was beaten."""
        cached = self._cache[j].get(h)
        if cached is not None:
            return cached
        signed_at = self.beats[j][min(h - 1, len(self.beats[j]) - 1)] if self.beats[j] else 0.0
        entry = MembershipEntry(
            self.ids[j], tuple(self.addrs[j]), self.inc[j] + h, round=120, left=(h >= self.left_hb),
            changed_at=0.0, ready=True, signed_at_ms=int((WALL0 + signed_at) * 1000),
        )  # fmt: skip
        entry.signature = self.keys[j].sign(entry.signed_part(RUN))
        self._cache[j][h] = wire = entry.wire()
        return wire

    def _start_observers(self, count: int) -> None:
        steady = [self._wire(j, 1) for j in range(self.n)]
        if self.m > membership_module.MAX_MEMBERS:
            # The daemon refuses tables past MAX_MEMBERS (4096) whole; lifted here, and said so in the output.
            membership_module.MAX_MEMBERS = self.m + 16
        for i in range(count):
            clock = lambda: WALL0 + self.now  # noqa: E731
            member = Membership(self.keys[i], RUN, self.addrs[i], 0.0, FAIL_AFTER, self.inc[i], clock)
            while len(member.members) < self.n:  # each table buys a bounded number of signature checks
                member.merge(steady, 0.0)
            member.refused.clear()
            self.observers[i] = member
            self.observer_cpu[i] = 0.0

    # --- the dynamics -----------------------------------------------------------------------------
    now = 0.0

    def _live_pick(self, i: int) -> int | None:
        row_h, row_c = self.H[i], self.C[i]
        for _ in range(32):  # nearly every member is live in every view: rejection is cheap
            j = self.rng.randrange(self.m)
            if j != i and row_h[j] and row_h[j] < self.left_hb and self.now - row_c[j] < FAIL_AFTER:
                return j
        live = np.flatnonzero((row_h > 0) & (row_h < self.left_hb) & (self.now - row_c < FAIL_AFTER))
        live = live[live != i]
        return int(self.rng.choice(live)) if len(live) else None

    def _beat(self, i: int, left: bool = False) -> None:
        self.hb[i] = self.left_hb if left else self.hb[i] + 1
        self.H[i, i] = self.hb[i]
        self.C[i, i] = self.now
        self.beats[i].append(self.now)
        self.signs[i] += 1
        if i in self.observers:
            if left:
                self.observers[i].leave()
            else:
                self.observers[i].beat(self.now, 120)

    def _table_bytes(self, i: int, answer: bool) -> float:
        return self.env_bytes[answer] + 5 + float(self.row_bytes[i])

    def _merge(self, into: int, source: int, size: float) -> None:
        """`into` merges `source`'s table (a message of `size` bytes it received)."""
        ours, theirs = self.H[into], self.H[source]
        grow = theirs > ours
        grow[into] = False  # only we speak for ourselves
        new = grow & (ours == 0)
        if new.any():
            self.row_bytes[into] += self.entry_bytes[new].sum()
        self.verifies[into] += np.count_nonzero(grow)
        self.held[into] += np.count_nonzero(theirs) - np.count_nonzero(grow)
        np.maximum(ours, theirs, out=ours, where=grow)
        self.C[into][grow] = self.now
        self.received[into] += size
        self.messages[into] += 1
        observer = self.observers.get(into)
        if observer is not None:
            self._real_merge(into, observer, source)

    def _real_merge(self, i: int, observer: Membership, source: int) -> None:
        """The observer takes `source`'s table for real: entries signed by their subjects, msgpack-coded."""
        row = self.H[source]
        table = [self._wire(int(j), int(row[j])) for j in np.flatnonzero(row)]
        packed = msgpack.packb(envelope(self.ids[source], True, table=table))
        t = time.process_time()
        message = msgpack.unpackb(packed)
        observer.merge(message["table"], self.now)
        self.observer_cpu[i] += time.process_time() - t
        if len(packed) > self._table_bytes(source, True):
            self.mismatches += 1  # the bytes model undercounts: must not happen
        held = observer.members
        known = np.flatnonzero(row)
        real = [held[self.ids[j]].heartbeat - self.inc[j] if self.ids[j] in held else 0 for j in known]
        self.refused.update(observer.refused)
        observer.refused.clear()
        self.mismatches += int(np.count_nonzero(np.array(real) != self.H[i][known]))

    def _send_table(self, i: int, answer: bool) -> float:
        size = self._table_bytes(i, answer)
        self.sent[i] += size
        self.messages[i] += 1
        observer = self.observers.get(i)
        if observer is not None:
            t = time.process_time()
            msgpack.packb(envelope(self.ids[i], answer, table=observer.table()))
            self.observer_cpu[i] += time.process_time() - t
        return size

    def _exchange(self, i: int, p: int) -> None:
        size = self._send_table(i, False)
        if not self.running[p] or self.rng.random() < self.loss:
            return  # no answer: the initiator times out
        self._merge(p, i, size)
        size = self._send_table(p, True)
        if self.rng.random() >= self.loss:
            self._merge(i, p, size)

    def _loop(self, i: int) -> None:
        self._beat(i)
        p = self._live_pick(i)
        if p is None:  # alone (the joiner at first): knock on a bootstrap peer
            p = self.rng.randrange(self.n - 2)
        self._exchange(i, p)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import heapq

        queue = [(self.rng.uniform(0, 1.2), i) for i in range(self.n)]
        heapq.heapify(queue)
        heapq.heappush(queue, (self.events.at, self.joiner))
        done_events = False
        next_sample = 0.0
        while queue and queue[0][0] <= self.seconds:
            t, i = heapq.heappop(queue)
            while next_sample <= t:
                self.now = next_sample
                self._sample()
                next_sample = round(next_sample + 0.1, 1)
            self.now = t
            if not done_events and t >= self.events.at:
                done_events = True
                self._events()
            if not self.running[i] and i != self.joiner:
                continue
            self.running[i] = True
            self._loop(i)
            heapq.heappush(queue, (t + self.rng.uniform(0.8, 1.2), i))
            if len(self._cache[i]) > 64:
                self._cache[i] = {h: w for h, w in self._cache[i].items() if h > self.hb[i] - 32}
        return self._results()

    def _events(self) -> None:
        self._beat(self.leaver, left=True)  # Membership.leave(): a heartbeat with left=True
        others = [j for j in range(self.n - 2)]
        for p in self.rng.sample(others, 3):
            self._exchange(self.leaver, p)
        self.running[self.leaver] = False
        self.running[self.crasher] = False

    def _sample(self) -> None:
        if self.now < self.events.at:
            return
        rows = np.flatnonzero(self.running[: self.n])
        rows = rows[rows < self.n - 2]
        ev = self.events
        ev.note("join", float(np.mean(self.H[rows, self.joiner] > 0)), self.now)
        told = self.H[rows, self.leaver] >= self.left_hb
        gone = told | (self.now - self.C[rows, self.leaver] >= FAIL_AFTER)
        ev.note("leave", float(np.mean(gone)), self.now)
        ev.note("crash", float(np.mean(self.now - self.C[rows, self.crasher] >= FAIL_AFTER)), self.now)
        if abs(self.now % 5.0) < 1e-6 or abs(self.now % 5.0 - 5.0) < 1e-6:
            ev.agreement.append(self._agreement(rows))

    def _agreement(self, rows: np.ndarray) -> float:
        """Share of peers whose live member list is the most common one (the pairing needs them equal)."""
        counts: dict[bytes, int] = {}
        for start in range(0, len(rows), 512):
            chunk = rows[start : start + 512]
            h = self.H[chunk]
            live = (h > 0) & (h < self.left_hb) & (self.now - self.C[chunk] < FAIL_AFTER)
            live[np.arange(len(chunk)), chunk] = True
            for packed in np.packbits(live, axis=1):
                key = packed.tobytes()
                counts[key] = counts.get(key, 0) + 1
        return max(counts.values()) / len(rows)

    def _results(self) -> dict[str, Any]:
        steady = np.arange(self.n - 2)
        window = self.seconds
        total = (self.sent + self.received)[steady]
        per_min = total / window * 60
        cpu_model = (
            self.verifies * COSTS["merge_new_entry_s"]
            + self.held * COSTS["merge_held_entry_s"]
            + self.signs * COSTS["sign_s"]
            + (self.sent + self.received) / 2 * COSTS["codec_s_per_byte"]  # each side codes once
        )
        observed = list(self.observer_cpu.values())  # their table() calls include their signatures
        return {
            "bytes_per_peer_per_min": round(float(per_min.mean())),
            "bytes_per_peer_per_min_p99": round(percentile(per_min, 99)),
            "kb_per_s_per_peer": round(float(per_min.mean()) / 60 / 1000, 2),
            "messages_per_peer_per_s": round(float(self.messages[steady].mean()) / window, 2),
            "join_99_s": self.events.join,
            "leave_99_s": self.events.leave,
            "crash_99_s": self.events.crash,
            "cpu_per_peer_s_per_s": round(float(np.mean(observed)) / window, 4) if observed else None,
            "cpu_model_per_peer_s_per_s": round(float(cpu_model[steady].mean()) / window, 4),
            "verifies_per_peer_per_s": round(float(self.verifies[steady].mean()) / window, 1),
            "held_entries_per_peer_per_s": round(float(self.held[steady].mean()) / window, 1),
            "member_list_agreement_min": round(min(self.events.agreement, default=math.nan), 4),
            "member_list_agreement_final": self.events.agreement[-1] if self.events.agreement else None,
            "largest_message_bytes": round(self._table_bytes(0, True)),
            "observers": len(self.observers),
            "observer_model_mismatches": self.mismatches,
            "observer_refused": dict(self.refused),
        }


COSTS: dict[str, float] = {}


def run_all_to_all(peers: int, args: argparse.Namespace) -> dict[str, Any]:
    observers = args.observers if args.observers is not None else (8 if peers <= 2000 else 2)
    t = time.perf_counter()
    sim = AllToAll(peers, args.seconds, args.event_at, args.loss, observers, args.seed)
    out = {"protocol": "all-to-all signed heartbeats", "peers": peers, **sim.run()}
    notes = [
        f"dynamics of all {peers} peers in NumPy; real Membership objects (keys, signatures, msgpack, merge) "
        f"on {observers} observer peers; cpu_per_peer_s_per_s is theirs, cpu_model_* extrapolates the real "
        "per-operation costs to every peer's counted verifies, merges, signatures and bytes"
    ]
    if peers + 1 > 4096:
        notes.append(
            "the daemon cannot run this: Membership.merge refuses tables over MAX_MEMBERS = 4096 entries "
            f"and the daemon's members messages over {DAEMON_MESSAGE_LIMIT} bytes; both lifted here"
        )
    out["notes"] = notes
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.membership_scale_swim import run_swim

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--peers", type=int, action="append", help="repeatable; default 1000")
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per run")
    ap.add_argument("--event-at", type=float, default=15.0, help="when the join, leave and crash happen")
    ap.add_argument("--loss", type=float, default=0.01, help="share of messages lost")
    ap.add_argument("--observers", type=int, default=None, help="all-to-all peers run for real")
    ap.add_argument("--protocols", default="all-to-all,swim")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    guard = f"membership_scale: over {WALL_CLOCK_GUARD_S} s; killed"
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(guard))
    signal.alarm(WALL_CLOCK_GUARD_S)
    COSTS.update(measure_costs())
    costs = [f"{k} {v * 1e9:.1f} ns" if "byte" in k else f"{k} {v * 1e6:.1f} us" for k, v in COSTS.items()]
    print("real costs (process CPU): " + ", ".join(costs))
    results = []
    for peers in args.peers or [1000]:
        if "all-to-all" in args.protocols:
            results.append(run_all_to_all(peers, args))
            _print_row(results[-1])
        if "swim" in args.protocols:
            results.append(run_swim(peers, args))
            _print_row(results[-1])
    _print_table(results)
    if args.json:
        doc = {"command": "python -m bench.membership_scale " + " ".join(argv or sys.argv[1:]),
               "target_kb_per_s_per_peer": TARGET_KB_S, "costs": COSTS, "results": results}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


def _print_row(r: dict[str, Any]) -> None:
    print(f"  {r['protocol']}, {r['peers']} peers: {r['kb_per_s_per_peer']} KB/s, join {r['join_99_s']} s, "
          f"leave {r['leave_99_s']} s, crash {r['crash_99_s']} s, wall {r['wall_s']} s")  # fmt: skip
    for note in r["notes"]:
        print(f"    note: {note}")


def _print_table(results: list[dict[str, Any]]) -> None:
    head = ("protocol", "peers", "B/peer/min", "p99", "KB/s", "x 20KB/s", "msg/s", "join99", "leave99",
            "crash99", "cpu s/s", "cpu model", "agree")  # fmt: skip
    print(" | ".join(head))
    for r in results:
        row = (
            r["protocol"], r["peers"], f"{r['bytes_per_peer_per_min']:,}",
            f"{r['bytes_per_peer_per_min_p99']:,}", r["kb_per_s_per_peer"],
            f"{r['kb_per_s_per_peer'] / TARGET_KB_S:.3g}", r["messages_per_peer_per_s"], r["join_99_s"],
            r["leave_99_s"], r["crash_99_s"], r["cpu_per_peer_s_per_s"], r["cpu_model_per_peer_s_per_s"],
            r["member_list_agreement_min"],
        )  # fmt: skip
        print(" | ".join(str(v) for v in row))


if __name__ == "__main__":
    sys.exit(main())
