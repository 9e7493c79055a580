"""The SWIM-style membership prototype (gossip/scalable_membership.py) in a small simulated network:
joins converge, departures and crashes reach everyone, forged accusations are refuted."""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

import msgpack
import pytest

from shoal.gossip.membership import MembershipEntry
from shoal.gossip.scalable_membership import (
    PERIOD_S,
    PROBE_TIMEOUT_S,
    SUSPECT_DOMAIN,
    ScalableMembership,
    Snapshot,
    suspect_timeout,
)
from shoal.transport.identity import generate_key

WALL = 1_800_000_000.0
RUN = "run"


class Net:
    """Peers exchanging msgpack-encoded messages with 10-50 ms latency; `down` peers are silent."""

    def __init__(self, peers: int, joiners: int = 0, seed: int = 1, loss: float = 0.0):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loss = loss
        self.queue: list[tuple[float, int, str, str, Any]] = []
        self.order = itertools.count()
        self.down: set[str] = set()
        self.peers: dict[str, ScalableMembership] = {}
        first = [self._make(i, None) for i in range(peers)]
        template = first[0]
        for member in first[1:]:  # one peer checks every entry; the others start from its table
            template.receive(member.peer_id, {"t": "sync-entries", "e": [member.me.wire()]}, 0.0)
        start = template.snapshot()
        for i in range(peers):
            self._add(self._make(i, start), start_at=self.rng.uniform(0, PERIOD_S))
        self.joiners = [self._make(peers + i, None) for i in range(joiners)]

    def _make(self, i: int, start: Snapshot | None) -> ScalableMembership:
        key = _keys(i)
        return ScalableMembership(
            key, RUN, f"/ip4/10.0.{i // 250}.{i % 250}/tcp/4001", 0.0, incarnation=1000,
            wall_clock=lambda: WALL + self.now, start=start, rng=random.Random(i),
        )  # fmt: skip

    def _add(self, peer: ScalableMembership, start_at: float) -> None:
        self.peers[peer.peer_id] = peer
        self._at(start_at, "period", peer.peer_id, None)

    def join(self, peer: ScalableMembership, contact: str) -> None:
        self._add(peer, self.now + PERIOD_S)
        self._send(peer.peer_id, peer.join(contact))

    def _at(self, t: float, kind: str, peer: str, payload: Any) -> None:
        heapq.heappush(self.queue, (t, next(self.order), kind, peer, payload))

    def _send(self, sender: str, out: list[tuple[str, dict[str, Any]]]) -> None:
        for to, message in out:
            if self.rng.random() >= self.loss:
                wire = msgpack.packb(message)
                self._at(self.now + self.rng.uniform(0.01, 0.05), "msg", to, (sender, wire))

    def run_until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            self.now, _, kind, peer_id, payload = heapq.heappop(self.queue)
            if peer_id in self.down or peer_id not in self.peers:
                continue
            peer = self.peers[peer_id]
            if kind == "period":
                self._send(peer_id, peer.period(self.now))
                self._at(self.now + PROBE_TIMEOUT_S, "timeout", peer_id, None)
                self._at(self.now + PERIOD_S, "period", peer_id, None)
            elif kind == "timeout":
                self._send(peer_id, peer.probe_timeout(self.now))
            else:
                sender, wire = payload
                self._send(peer_id, peer.receive(sender, msgpack.unpackb(wire), self.now))
        self.now = t

    def up(self) -> list[ScalableMembership]:
        return [p for pid, p in self.peers.items() if pid not in self.down]


_KEYS: dict[int, Any] = {}


def _keys(i: int) -> Any:
    if i not in _KEYS:
        _KEYS[i] = generate_key()
    return _KEYS[i]


def _knows(peer: ScalableMembership, subject: str) -> bool:
    entry = peer.entry(subject)
    return entry is not None and not entry.left


def test_a_few_hundred_peers_converge_on_one_member_list_with_joiners():
    net = Net(peers=200, joiners=40)
    net.run_until(2.0)
    contacts = list(net.peers)
    for joiner in net.joiners:
        net.join(joiner, net.rng.choice(contacts))
        net.run_until(net.now + 0.1)
    net.run_until(net.now + 30.0)
    assert {len(p) for p in net.up()} == {240}
    assert len({p.fingerprint() for p in net.up()}) == 1  # the same members, at the same incarnations
    assert len({tuple(p.live(net.now)) for p in net.up()}) == 1


def test_a_departure_and_a_crash_reach_everyone():
    net = Net(peers=150)
    net.run_until(3.0)
    ids = list(net.peers)
    leaver, crasher = ids[10], ids[20]
    net._send(leaver, net.peers[leaver].leave(net.now))
    net.down.update({leaver, crasher})
    start = net.now
    net.run_until(start + 10.0)
    assert not any(_knows(p, leaver) for p in net.up())  # a signed departure spreads within seconds
    net.run_until(start + 4 + suspect_timeout(150) + 10)
    assert not any(_knows(p, crasher) for p in net.up())
    assert all(len(p.live(net.now)) == 148 for p in net.up())  # the leaver's entry stays a minute, as left
    assert len({p.fingerprint() for p in net.up()}) == 1


def test_a_forged_accusation_is_refuted_and_never_removes_its_subject():
    net = Net(peers=120, loss=0.01)
    net.run_until(2.0)
    ids = list(net.peers)
    accuser, subject = net.peers[ids[0]], net.peers[ids[1]]
    before = subject.me.heartbeat
    # The accuser probes nothing: it signs a suspicion of a live member and spreads it to many peers.
    for target in ids[2:40]:
        net._send(accuser.peer_id, [(target, {"t": "ping", "seq": 1, "u": [_accusation(accuser, subject)]})])
    for _ in range(int((suspect_timeout(120) + 10) / 0.5)):
        net.run_until(net.now + 0.5)
        assert all(_knows(p, subject.peer_id) for p in net.up())  # never removed, not for a moment
    assert subject.me.heartbeat > before  # it refuted with a newer entry of its own
    assert all(p.entry(subject.peer_id).heartbeat == subject.me.heartbeat for p in net.up())
    assert not any(subject.peer_id in p.suspects for p in net.up())


def _accusation(accuser: ScalableMembership, subject: ScalableMembership) -> dict[str, Any]:
    at = int((WALL + 2.0) * 1000)
    inc = subject.me.heartbeat
    signed = [SUSPECT_DOMAIN, RUN, accuser.peer_id, subject.peer_id, inc, at]
    sig = accuser.key.sign(msgpack.packb(signed))
    return {"s": {"subject": subject.peer_id, "inc": inc, "by": accuser.peer_id, "at": at, "sig": sig}}


def test_a_stranger_cannot_accuse_and_an_accusation_alone_times_out_only_without_refutation():
    net = Net(peers=20)
    net.run_until(1.5)
    ids = list(net.peers)
    stranger = ScalableMembership(generate_key(), RUN, "/ip4/10.9.9.9/tcp/1", 0.0, wall_clock=lambda: WALL)
    observer = net.peers[ids[2]]
    observer.receive(
        stranger.peer_id, {"t": "ping", "seq": 1, "u": [_accusation(stranger, net.peers[ids[1]])]}, 1.5
    )
    assert ids[1] not in observer.suspects
    assert observer.refused["suspicions from non-members"] == 1


@pytest.mark.parametrize("forgery", ["other_key", "changed_field", "no_signature"])
def test_entries_not_signed_by_their_subject_are_refused(forgery):
    member = ScalableMembership(generate_key(), RUN, "/ip4/10.0.0.1/tcp/1", 0.0, wall_clock=lambda: WALL)
    victim = ScalableMembership(generate_key(), RUN, "/ip4/10.0.0.2/tcp/1", 0.0, wall_clock=lambda: WALL)
    entry: MembershipEntry = victim.me
    wire = entry.wire()
    if forgery == "other_key":  # a relay signs the victim's entry (moved to its own address) itself
        wire["addrs"] = ["/ip4/6.6.6.6/tcp/1"]
        moved = MembershipEntry(entry.peer_id, ("/ip4/6.6.6.6/tcp/1",), entry.heartbeat, 0, False, 0.0,
                                signed_at_ms=entry.signed_at_ms)  # fmt: skip
        wire["sig"] = member.key.sign(moved.signed_part(RUN))
    elif forgery == "changed_field":  # the victim's signature, a higher incarnation marked left
        wire["heartbeat"] += 5
        wire["left"] = True
    else:
        wire["sig"] = b"\0" * 64
    member.receive("relay", {"t": "ping", "seq": 1, "u": [{"e": wire}]}, 0.0)
    member.receive("relay", {"t": "sync-entries", "e": [wire]}, 0.0)
    assert member.entry(victim.peer_id) is None
    assert member.refused["entries not signed by the member they describe"] == 2
    member.receive(victim.peer_id, {"t": "sync-entries", "e": [victim.me.wire()]}, 0.0)
    assert member.entry(victim.peer_id) is not None  # the genuine entry is taken
