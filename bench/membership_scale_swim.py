"""The scalable variant's half of bench.membership_scale: every peer a real ScalableMembership.

All N peers run the real object (real keys, signatures, msgpack, digest syncs) in one discrete-event
loop: each peer's period starts at a random phase and recurs every PERIOD_S, probe timeouts come
PROBE_TIMEOUT_S later, messages take 10-50 ms and `loss` of them vanish. The peers start from one table
that a single peer verified (copy-on-write: 10,000 full tables would not fit in memory); from there on
every entry and suspicion is checked by each peer that takes it. CPU per peer is the process time spent
in the peers' own calls and their msgpack coding, divided by peers and simulated seconds.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import time
from collections import Counter
from typing import Any

import msgpack
import numpy as np

from bench.membership_scale import RUN, WALL0, Events, addrs_of, percentile
from shoal.gossip.scalable_membership import (
    PERIOD_S,
    PROBE_TIMEOUT_S,
    ScalableMembership,
    Snapshot,
    suspect_timeout,
)
from shoal.transport.identity import generate_key, peer_id_from_key

PROTOCOL = "SWIM + signed entries + digest sync"


class SwimSim:
    def __init__(self, peers: int, seconds: float, event_at: float, loss: float, seed: int):
        self.n, self.seconds, self.loss = peers, seconds, loss
        self.rng = random.Random(seed)
        self.now = 0.0
        self.keys = [generate_key() for _ in range(peers + 1)]
        self.ids = [str(peer_id_from_key(k)) for k in self.keys]
        self.inc = [int(WALL0 * 1000) - 10**6 + i for i in range(peers + 1)]
        clock = lambda: WALL0 + self.now  # noqa: E731
        self.clock = clock
        self.joiner_i, self.leaver_i, self.crasher_i = peers, peers - 1, peers - 2
        start = self._start_table()
        self.peers: list[ScalableMembership] = [self._make(i, start) for i in range(peers)]
        self.index = {p.peer_id: i for i, p in enumerate(self.peers)}
        self.down: set[int] = set()
        self.events = Events(event_at)
        self.sent = np.zeros(peers + 1)
        self.received = np.zeros(peers + 1)
        self.messages = np.zeros(peers + 1)
        self.cpu = 0.0
        self.queue: list[tuple[float, int, int, int, Any]] = []
        self.order = itertools.count()

    def _make(self, i: int, start: Snapshot | None) -> ScalableMembership:
        addrs = addrs_of(i, self.ids[i])
        return ScalableMembership(self.keys[i], RUN, addrs, 0.0, self.inc[i], self.clock, start=start,
                                  rng=random.Random(i))  # fmt: skip

    def _start_table(self) -> Snapshot:
        """Every peer's signed entry, checked once by one peer, frozen for all to start from."""
        first = [self._make(i, None) for i in range(self.n)]
        for member in first:
            member.set_ready(0.0)  # as a trained-on peer's entry is
        template = first[0]
        for chunk in range(0, self.n, 4096):  # one message takes at most MAX_SYNC_ENTRIES
            entries = [m.me.wire() for m in first[chunk : chunk + 4096]]
            template.receive(first[1].peer_id, {"t": "sync-entries", "e": entries}, 0.0)
        assert len(template) == self.n, len(template)
        return template.snapshot()

    # --- the network ------------------------------------------------------------------------------
    def _at(self, t: float, kind: int, i: int, payload: Any = None) -> None:
        heapq.heappush(self.queue, (t, next(self.order), kind, i, payload))

    def _send(self, i: int, out: list[tuple[str, dict[str, Any]]]) -> None:
        sender = self.peers[i].peer_id
        for to, message in out:
            t = time.process_time()
            wire = msgpack.packb({"v": 2, "type": "swim", "run": RUN, "from": sender, "m": message})
            self.cpu += time.process_time() - t
            self.sent[i] += len(wire)
            self.messages[i] += 1
            if self.rng.random() >= self.loss:
                self._at(self.now + self.rng.uniform(0.01, 0.05), 2, self.index[to], wire)

    def _call(self, i: int, kind: int, payload: Any) -> None:
        peer = self.peers[i]
        t = time.process_time()
        if kind == 0:
            out = peer.period(self.now)
        elif kind == 1:
            out = peer.probe_timeout(self.now)
        else:
            self.received[i] += len(payload)
            self.messages[i] += 1
            message = msgpack.unpackb(payload)
            out = peer.receive(message["from"], message["m"], self.now)
        self.cpu += time.process_time() - t
        self._send(i, out)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        for i in range(self.n):
            self._at(self.rng.uniform(0, PERIOD_S), 0, i)
        self._at(self.events.at, 3, -1)
        next_sample = 0.0
        while self.queue and self.queue[0][0] <= self.seconds:
            t, _, kind, i, payload = heapq.heappop(self.queue)
            while next_sample <= t:
                self.now = next_sample
                self._sample()
                next_sample = round(next_sample + 0.2, 1)
            self.now = t
            if kind == 3:
                self._events()
                continue
            if i in self.down:
                continue
            self._call(i, kind, payload)
            if kind == 0:
                self._at(t + PROBE_TIMEOUT_S, 1, i)
                self._at(t + PERIOD_S, 0, i)
        return self._results()

    def _events(self) -> None:
        joiner = self._make(self.joiner_i, None)
        joiner.set_ready(self.now)
        self.peers.append(joiner)
        self.index[joiner.peer_id] = self.joiner_i
        contact = self.rng.randrange(self.n - 2)
        self._send(self.joiner_i, joiner.join(self.peers[contact].peer_id))
        self._at(self.now + PERIOD_S, 0, self.joiner_i)
        self._send(self.leaver_i, self.peers[self.leaver_i].leave(self.now))
        self.down.update({self.leaver_i, self.crasher_i})

    def _sample(self) -> None:
        if self.now < self.events.at:
            return
        rows = self.peers[: self.n - 2]
        ids = [self.ids[j] for j in (self.joiner_i, self.leaver_i, self.crasher_i)]
        joiner, leaver, crasher = ids
        ev = self.events
        if math.isnan(ev.join):
            ev.note("join", sum(_member(p, joiner) for p in rows) / len(rows), self.now)
        if math.isnan(ev.leave):
            ev.note("leave", sum(not _member(p, leaver) for p in rows) / len(rows), self.now)
        if math.isnan(ev.crash):
            ev.note("crash", sum(not _member(p, crasher) for p in rows) / len(rows), self.now)
        if abs(self.now % 5.0) < 1e-6 or abs(self.now % 5.0 - 5.0) < 1e-6:
            prints = Counter(p.fingerprint() for p in rows)
            ev.agreement.append(max(prints.values()) / len(rows))

    def _results(self) -> dict[str, Any]:
        steady = np.arange(self.n - 2)
        per_min = (self.sent + self.received)[steady] / self.seconds * 60
        joiner = self.peers[self.joiner_i] if len(self.peers) > self.n else None
        refuted = sum(p.me.heartbeat > self.inc[i] + 2 for i, p in enumerate(self.peers[: self.n - 2]))
        verified = sum(p.verified for p in self.peers[: self.n - 2])
        return {
            "bytes_per_peer_per_min": round(float(per_min.mean())),
            "bytes_per_peer_per_min_p99": round(percentile(per_min, 99)),
            "kb_per_s_per_peer": round(float(per_min.mean()) / 60 / 1000, 3),
            "messages_per_peer_per_s": round(float(self.messages[steady].mean()) / self.seconds, 2),
            "join_99_s": self.events.join,
            "leave_99_s": self.events.leave,
            "crash_99_s": self.events.crash,
            "cpu_per_peer_s_per_s": round(self.cpu / len(self.peers) / self.seconds, 5),
            "cpu_model_per_peer_s_per_s": None,
            "verifies_per_peer_per_s": round(verified / (self.n - 2) / self.seconds, 3),
            "member_list_agreement_min": round(min(self.events.agreement, default=math.nan), 4),
            "member_list_agreement_final": self.events.agreement[-1] if self.events.agreement else None,
            "suspect_timeout_s": round(suspect_timeout(self.n), 2),
            "peers_that_refuted_a_suspicion": int(refuted),
            "join_bytes_received_by_joiner": int(self.received[self.joiner_i]) if joiner else None,
        }


def _member(peer: ScalableMembership, subject: str) -> bool:
    entry = peer.entry(subject)
    return entry is not None and not entry.left


def run_swim(peers: int, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    sim = SwimSim(peers, args.seconds, args.event_at, args.loss, args.seed)
    setup = time.perf_counter() - t
    out = {"protocol": PROTOCOL, "peers": peers, **sim.run()}
    out["notes"] = [
        f"all {peers} peers run the real ScalableMembership; they start from one table verified once "
        f"(setup {setup:.0f} s), shared copy-on-write; the joiner's one-time table sync is reported "
        "apart (join_bytes_received_by_joiner; its contact's share is in the figures)"
    ]
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out
