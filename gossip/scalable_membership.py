"""Membership past a thousand peers: SWIM-style liveness (Das et al., "SWIM", 2002) over the signed
entries of gossip/membership.py. A prototype, not wired into the daemon (docs/benchmarks.md, issue 16).

Why not all-to-all: every heartbeat of every member reaching every peer costs each peer O(N) signed
entries a second (about 1 MB/s at 1,000 peers). Here liveness is local and only *changes* travel:

- Each period a peer pings one random member; a member that does not answer, directly or through
  `INDIRECT_PROBES` others (ping-req), is suspected. The suspicion is signed by its accuser, sent to the
  subject at once and piggybacked to everyone; each peer that takes it starts its own timer.
- Nobody speaks for another peer: a suspicion never removes a member before `suspect_timeout` has run out
  at each peer, and the subject refutes it by signing its entry again with a higher incarnation (the
  entry's `heartbeat` field); any peer that holds the newer entry ignores suspicions of the older one.
- Entries are the members' own signed entries (MembershipEntry, same signed part and checks); they change
  only when a member joins, leaves (left=True), refutes, or changes its addresses or readiness.
- Changes spread by piggyback on pings and acks (at most `MAX_PIGGYBACK` per message, each sent
  `RETRANSMIT_MULT * log10(N)` times by each peer), and a digest sync (bucketed hashes of (member,
  incarnation); then listings and entries of the differing buckets only) repairs what rumors missed and
  brings a joiner the whole table, so every peer ends with the same member list, which the round
  pairing (gossip/rounds/pairing.py) needs.

Sans-I/O: the caller delivers messages (`receive`), calls `period` every PERIOD_S and `probe_timeout` a
while after, passes `now`, and carries the returned (peer id, message) pairs over its transport.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.gossip.admission import Admission
from shoal.gossip.membership import MembershipEntry, _as_tuple, _bounded_int, _parse_entry
from shoal.transport.identity import PeerID, PublicKey, peer_id_from_key
from shoal.transport.identity_work import meets

PERIOD_S = 1.0
PROBE_TIMEOUT_S = 0.5  # the caller calls probe_timeout() this long into a period
INDIRECT_PROBES = 3
MAX_PIGGYBACK = 8  # updates per ping/ack: bounds each message whatever the churn
RETRANSMIT_MULT = 4  # times log10(N): how often each peer passes on each update
SUSPICION_MULT = 2.5  # times log10(N) periods: a suspect's time to refute
SYNC_EVERY = 10  # periods between digest syncs (every period while a sync still brings entries)
BUCKETS = 256
MAX_SYNC_ENTRIES = 4096  # entries or listings per sync message (about 1 MB)
LEFT_KEEP_S = 60.0  # a member that left is held this long so that its last entry spreads
# Entries change only on events, so they may be old: a member re-signs its entry every REFRESH_S, and an
# entry first heard of must be younger than MAX_ENTRY_AGE_S (a replay of a long-dead member is refused).
REFRESH_S = 6 * 3600.0
MAX_ENTRY_AGE_S = 2 * REFRESH_S + 600.0
MAX_SUSPICION_AGE_S = 120.0
MAX_MEMBERS = 1 << 16
MAX_FORGOTTEN = 1 << 16
SUSPECT_DOMAIN = b"shoal-suspect/1"

Send = tuple[str, dict[str, Any]]


def suspect_timeout(members: int, period: float = PERIOD_S) -> float:
    return SUSPICION_MULT * max(1.0, math.log10(max(members, 10))) * period


def retransmits(members: int) -> int:
    return RETRANSMIT_MULT * max(1, math.ceil(math.log10(members + 1)))


@functools.lru_cache(maxsize=1 << 17)
def _hid(peer_id: str) -> int:
    """A member's 8-byte digest id: uniform, so it also picks the member's bucket."""
    return int.from_bytes(hashlib.blake2b(peer_id.encode(), digest_size=8).digest(), "big")


def _version_hash(peer_id: str, incarnation: int, left: bool) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{peer_id}/{incarnation}/{int(left)}".encode(), digest_size=8).digest(), "big"
    )


@functools.lru_cache(maxsize=1 << 17)
def _public_key(peer_id: str) -> PublicKey | None:
    """Parsed once per process: one daemon holds one table, a simulator thousands of the same ids."""
    try:
        return PeerID.from_string(peer_id).public_key()
    except ValueError:
        return None  # not a peer id at all (hashed ids carry no key: refused too)


def _verify(peer_id: str, signature: bytes, message: bytes) -> bool:
    key = _public_key(peer_id)
    return key is not None and key.verify(signature, message)


@dataclass(frozen=True)
class Snapshot:
    """A member table frozen to start other instances from (a simulator's shared start): never written."""

    entries: Mapping[str, MembershipEntry]
    ids: Sequence[str]
    buckets: tuple[int, ...]


class _Table:
    """Entries by peer id: this peer's own changes over a read-only, shareable base."""

    def __init__(self, base: Snapshot | None = None):
        self._base: Mapping[str, MembershipEntry] = base.entries if base else {}
        self._base_ids: Sequence[str] = base.ids if base else ()
        self._own: dict[str, MembershipEntry] = {}
        self._own_ids: list[str] = []  # ids not in the base, for random picks (removed ones linger)
        self._gone: set[str] = set()  # base ids removed here
        self._count = len(self._base)

    def get(self, peer_id: str) -> MembershipEntry | None:
        entry = self._own.get(peer_id)
        if entry is not None or peer_id in self._gone:
            return entry
        return self._base.get(peer_id)

    def __contains__(self, peer_id: str) -> bool:
        return self.get(peer_id) is not None

    def __len__(self) -> int:
        return self._count

    def put(self, entry: MembershipEntry) -> None:
        peer_id = entry.peer_id
        if self.get(peer_id) is None:
            self._count += 1
            if peer_id not in self._base:
                self._own_ids.append(peer_id)
        self._gone.discard(peer_id)
        self._own[peer_id] = entry

    def remove(self, peer_id: str) -> None:
        if self.get(peer_id) is None:
            return
        self._count -= 1
        self._own.pop(peer_id, None)
        if peer_id in self._base:
            self._gone.add(peer_id)
        if len(self._own_ids) > 2 * len(self._own) + 64:
            own = dict.fromkeys(self._own_ids)
            self._own_ids = [p for p in own if p in self._own and p not in self._base]

    def items(self) -> Iterator[tuple[str, MembershipEntry]]:
        yield from self._own.items()
        for peer_id, entry in self._base.items():
            if peer_id not in self._own and peer_id not in self._gone:
                yield peer_id, entry

    def random_id(self, rng: random.Random, accept: Callable[[str], bool]) -> str | None:
        total = len(self._base_ids) + len(self._own_ids)
        for _ in range(64):  # removed and refused ids are few: a handful of tries finds a member
            if total == 0:
                return None
            i = rng.randrange(total)
            peer_id = self._base_ids[i] if i < len(self._base_ids) else self._own_ids[i - len(self._base_ids)]
            if peer_id in self and accept(peer_id):
                return peer_id
        choices = [p for p, _ in self.items() if accept(p)]  # nearly everyone refused: look at all
        return rng.choice(choices) if choices else None


@dataclass
class _Probe:
    target: str
    seq: int
    acked: bool = False
    helpers: tuple[str, ...] = ()


class ScalableMembership:
    def __init__(
        self,
        key: ed25519.Ed25519PrivateKey,
        run_id: str,
        addrs: str | list[str],
        now: float,
        incarnation: int = 0,
        wall_clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
        token: bytes | None = None,
        start: Snapshot | None = None,
        rng: random.Random | None = None,
        work_bits: int = 0,
        work: int = 0,
    ):
        self.key = key
        self.run_id = run_id
        self.peer_id = str(peer_id_from_key(key))
        self.wall_clock = wall_clock
        self.admission = admission
        self.work_bits = work_bits  # identity work every member must prove, as in membership.py
        self.rng = rng or random.Random()
        self.me = MembershipEntry(
            self.peer_id, _as_tuple(addrs), heartbeat=incarnation + 1, round=0, left=False,
            changed_at=now, ready=False, token=token, work=work,
        )  # fmt: skip
        self._table = _Table(start)
        self._buckets = list(start.buckets) if start else [0] * BUCKETS
        self._fingerprint = 0
        for value in self._buckets:
            self._fingerprint ^= value
        own_in_start = self._table.get(self.peer_id)
        if own_in_start is not None:
            self._unhash(own_in_start)
            self.me.heartbeat = max(self.me.heartbeat, own_in_start.heartbeat)
        self._sign_own()
        self._store(self.me)
        self.forgotten: OrderedDict[str, int] = OrderedDict()  # peer id -> incarnation when dropped
        self.suspects: dict[str, tuple[int, float]] = {}  # peer id -> (incarnation, deadline)
        self._leaving: dict[str, float] = {}  # members that left -> when we drop them
        self._rumors: dict[tuple[str, str], list[Any]] = {}  # key -> [item, times sent]
        self._probe: _Probe | None = None
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> (requester, its seq, sent at)
        self._seq = 0
        self._periods = 0
        self._sync_again = True  # a newcomer syncs every period until a sync brings nothing
        self._signed_at = now
        self.refused: Counter[str] = Counter()
        self.verified = 0  # signature checks done (for the benchmark's CPU accounting)

    # --- state ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def entry(self, peer_id: str) -> MembershipEntry | None:
        return self._table.get(peer_id)

    def live(self, now: float) -> list[str]:
        """Members not known to have left (suspects included: until their timeout they are members)."""
        return sorted(p for p, e in self._table.items() if not e.left)

    def ready(self, now: float) -> list[str]:
        return sorted(p for p, e in self._table.items() if not e.left and e.ready)

    def fingerprint(self) -> int:
        """The hash of the member list with incarnations: equal at two peers when their lists are."""
        return self._fingerprint

    def snapshot(self) -> Snapshot:
        entries = dict(self._table.items())
        return Snapshot(MappingProxyType(entries), tuple(entries), tuple(self._buckets))

    # --- our own entry ----------------------------------------------------------------------------
    def _sign_own(self) -> None:
        me = self.me
        me.signed_at_ms = int(self.wall_clock() * 1000)
        me.signature = self.key.sign(me.signed_part(self.run_id))

    def _republish(self, now: float) -> None:
        """A new incarnation of our entry, signed and spread."""
        self._unhash(self.me)
        self.me.heartbeat += 1
        self.me.changed_at = now
        self._sign_own()
        self._signed_at = now
        self._store(self.me)
        self._enqueue(("e", self.peer_id), {"e": self.me.wire()})

    def set_ready(self, now: float) -> None:
        if not self.me.ready:
            self.me.ready = True
            self._republish(now)

    def set_addrs(self, addrs: list[str], now: float) -> None:
        self.me.addrs = _as_tuple(addrs)
        self._republish(now)

    def leave(self, now: float, fanout: int = 3) -> list[Send]:
        """Signs that we leave and tells `fanout` members at once; the rumor does the rest."""
        self.me.left = True
        self._republish(now)
        targets = self._random_members(fanout, exclude=())
        return [(t, self._message("ping", seq=self._next_seq())) for t in targets]

    def join(self, contact: str) -> list[Send]:
        """Our first sync, with a member we know of (a bootstrap peer): it brings us the table and takes
        our entry, which it then spreads."""
        self._sync_again = True
        return [(contact, self._plain("sync", d=self._buckets))]

    # --- the protocol period ----------------------------------------------------------------------
    def period(self, now: float) -> list[Send]:
        """Ends the last probe (suspecting an unanswered target), expires timers, starts the next probe,
        and every SYNC_EVERY periods a digest sync."""
        out: list[Send] = []
        probe = self._probe
        if probe is not None and not probe.acked:
            out.extend(self._suspect(probe.target, now))
        self._expire(now)
        if now - self._signed_at > REFRESH_S:
            self._republish(now)
        self._probe = None
        target = self._random_member()
        if target is not None:
            self._probe = _Probe(target, self._next_seq())
            out.append((target, self._message("ping", seq=self._probe.seq)))
        self._periods += 1
        if self._sync_again or self._periods % SYNC_EVERY == 0:
            partner = self._random_member()
            if partner is not None:
                self._sync_again = False
                out.append((partner, self._plain("sync", d=self._buckets)))
        return out

    def probe_timeout(self, now: float) -> list[Send]:
        """No ack yet: ask a few others to ping the target for us."""
        probe = self._probe
        if probe is None or probe.acked:
            return []
        probe.helpers = tuple(self._random_members(INDIRECT_PROBES, exclude=(probe.target,)))
        return [(h, self._message("ping-req", seq=probe.seq, target=probe.target)) for h in probe.helpers]

    def _suspect(self, target: str, now: float) -> list[Send]:
        entry = self._table.get(target)
        if entry is None or entry.left:
            return []
        at = int(self.wall_clock() * 1000)
        signed = [SUSPECT_DOMAIN, self.run_id, self.peer_id, target, entry.heartbeat, at]
        suspicion = {"subject": target, "inc": entry.heartbeat, "by": self.peer_id, "at": at,
                     "sig": self.key.sign(msgpack.packb(signed))}  # fmt: skip
        self._take_suspicion(suspicion, now)
        # The subject hears it at once, so a live one refutes before the rumor's timers run out.
        return [(target, self._plain("ping", seq=self._next_seq(), u=[{"s": suspicion}]))]

    def _expire(self, now: float) -> None:
        for peer_id, (incarnation, deadline) in list(self.suspects.items()):
            if deadline <= now:
                del self.suspects[peer_id]
                entry = self._table.get(peer_id)
                if entry is not None and entry.heartbeat == incarnation:
                    self._forget(peer_id)
        for peer_id, until in list(self._leaving.items()):
            if until <= now:
                del self._leaving[peer_id]
                self._forget(peer_id)
        for seq, (_, _, sent) in list(self._relays.items()):
            if now - sent > 2 * PERIOD_S:
                del self._relays[seq]

    # --- messages ---------------------------------------------------------------------------------
    def receive(self, sender: str, message: Any, now: float) -> list[Send]:
        """One message from `sender` (authenticated by the transport); returns what to send back."""
        if not isinstance(message, dict):
            self.refused["messages that are not maps"] += 1
            return []
        updates = message.get("u")
        if isinstance(updates, list):
            for item in updates[: 2 * MAX_PIGGYBACK]:
                self._take_update(item, sender, now)
        kind, raw_seq = message.get("t"), message.get("seq")
        seq = raw_seq if _bounded_int(raw_seq, 2**63) else -1
        if kind in ("ping", "ping-req", "ack") and seq < 0:
            self.refused["probes without a sequence number"] += 1
            return []
        if kind == "ping":
            return [(sender, self._message("ack", seq=seq))]
        if kind == "ping-req":
            target = message.get("target")
            if not isinstance(target, str) or target not in self._table or target == sender:
                return []
            ours = self._next_seq()
            self._relays[ours] = (sender, seq, now)
            return [(target, self._message("ping", seq=ours))]
        if kind == "ack":
            relay = self._relays.pop(seq, None)
            if relay is not None:
                return [(relay[0], self._message("ack", seq=relay[1]))]
            probe = self._probe
            if probe is not None and probe.seq == seq and (sender == probe.target or sender in probe.helpers):
                probe.acked = True
            return []
        if kind == "sync":
            return self._answer_sync(sender, message.get("d"))
        if kind == "sync-diff":
            return self._sync_diff(sender, message.get("b"), message.get("l"), now)
        if kind == "sync-push":
            return self._sync_push(sender, message.get("e"), message.get("w"), now)
        if kind == "sync-entries":
            taken = self._take_entries(message.get("e"), sender, now)
            self._sync_again = self._sync_again or taken > 0
            return []
        self.refused["messages of an unknown type"] += 1
        return []

    def _take_update(self, item: Any, sender: str, now: float) -> None:
        if isinstance(item, dict) and "e" in item:
            self._take_entry(item["e"], sender, now, rumor=True)
        elif isinstance(item, dict) and "s" in item:
            self._take_suspicion(item["s"], now)
        else:
            self.refused["malformed updates"] += 1

    def _take_entry(self, raw: Any, sender: str, now: float, rumor: bool) -> bool:
        """Takes a member's entry when it is newer than ours and signed by that member."""
        entry = _parse_entry(raw, now)
        if entry is None:
            self.refused["malformed entries"] += 1
            return False
        peer_id = entry.peer_id
        if peer_id == self.peer_id:
            if entry.heartbeat > self.me.heartbeat and self._signed_by_member(entry):
                self.me.heartbeat = entry.heartbeat  # a previous life of ours: out-count it
                self._republish(now)
            return False
        held = self._table.get(peer_id)
        if held is not None and entry.heartbeat <= held.heartbeat:
            return False
        if peer_id in self.forgotten and entry.heartbeat <= self.forgotten[peer_id]:
            return False
        wall_ms = self.wall_clock() * 1000
        if held is None and abs(wall_ms - entry.signed_at_ms) > MAX_ENTRY_AGE_S * 1000:
            self.refused["entries signed too long ago or in the future"] += 1
            return False
        if not meets(peer_id, entry.work, self.work_bits):  # one hash: before the signature
            self.refused[f"entries without {self.work_bits} bits of identity work"] += 1
            return False
        if not self._signed_by_member(entry):
            self.refused["entries not signed by the member they describe"] += 1
            return False
        if self.admission is not None:
            why = self.admission.refuses(peer_id, entry.token, wall_ms / 1000)
            if why is not None:
                self.refused[f"entries with {why} (this run is closed)"] += 1
                return False
        if held is None and len(self._table) >= MAX_MEMBERS:
            self.refused["entries past the member limit"] += 1
            return False
        self.forgotten.pop(peer_id, None)
        if held is not None:
            self._unhash(held)
        self._store(entry)
        suspected = self.suspects.get(peer_id)
        if suspected is not None and suspected[0] < entry.heartbeat:
            del self.suspects[peer_id]  # refuted: only the member's own newer entry does this
        if entry.left:
            self._leaving[peer_id] = now + LEFT_KEEP_S
        # Rumors are passed on; a sync's repairs are not (they are old news elsewhere), except a
        # newcomer's own entry, which its first sync brings to its first contact.
        if rumor or peer_id == sender:
            self._enqueue(("e", peer_id), {"e": entry.wire()})
        return True

    def _signed_by_member(self, entry: MembershipEntry) -> bool:
        self.verified += 1
        return _verify(entry.peer_id, entry.signature, entry.signed_part(self.run_id))

    def _take_suspicion(self, raw: Any, now: float) -> None:
        """A member's signed accusation: starts our timer on the subject's current entry (or, about us,
        makes us refute). It never removes anyone by itself."""
        if not isinstance(raw, dict):
            self.refused["malformed suspicions"] += 1
            return
        subject, incarnation, accuser = raw.get("subject"), raw.get("inc"), raw.get("by")
        at, signature = raw.get("at"), raw.get("sig")
        if not (
            isinstance(subject, str)
            and isinstance(accuser, str)
            and _bounded_int(incarnation, 2**63)
            and _bounded_int(at, 2**63)
            and isinstance(signature, bytes)
        ):
            self.refused["malformed suspicions"] += 1
            return
        if subject == self.peer_id:
            if incarnation >= self.me.heartbeat and self._accusation_holds(raw, accuser):
                self.me.heartbeat = incarnation
                self._republish(now)  # refute: a newer entry of ours, signed by us
            return
        held = self._table.get(subject)
        if held is None or held.left or held.heartbeat != incarnation:
            return  # about an entry we do not hold (or hold newer): nothing to time
        current = self.suspects.get(subject)
        if current is not None and current[0] >= incarnation:
            return  # already timing this one
        if not self._accusation_holds(raw, accuser):
            return
        self.suspects[subject] = (incarnation, now + suspect_timeout(len(self._table)))
        self._enqueue(("s", subject), {"s": raw})

    def _accusation_holds(self, raw: dict[str, Any], accuser: str) -> bool:
        """Signed by a current member, recently."""
        accused_by = self._table.get(accuser)
        if accused_by is None or accused_by.left:
            self.refused["suspicions from non-members"] += 1
            return False
        if abs(self.wall_clock() * 1000 - raw["at"]) > MAX_SUSPICION_AGE_S * 1000:
            self.refused["suspicions signed too long ago or in the future"] += 1
            return False
        self.verified += 1
        signed = [SUSPECT_DOMAIN, self.run_id, accuser, raw["subject"], raw["inc"], raw["at"]]
        if not _verify(accuser, raw["sig"], msgpack.packb(signed)):
            self.refused["suspicions not signed by their accuser"] += 1
            return False
        return True

    # --- digest sync ------------------------------------------------------------------------------
    def _answer_sync(self, sender: str, digest: Any) -> list[Send]:
        if not (isinstance(digest, list) and len(digest) == BUCKETS):
            self.refused["malformed digests"] += 1
            return []
        differing = {b for b in range(BUCKETS) if digest[b] != self._buckets[b]}
        if not differing:
            return []
        by_bucket: dict[int, list[list[int]]] = {b: [] for b in differing}
        for peer_id, entry in self._table.items():
            items = by_bucket.get(_hid(peer_id) % BUCKETS)
            if items is not None:
                items.append([_hid(peer_id), entry.heartbeat, int(entry.left)])
        # Whole buckets in a random order up to the cap: a newcomer's repeated syncs each bring more.
        order = list(by_bucket)
        self.rng.shuffle(order)
        listing: list[list[int]] = []
        listed: list[int] = []  # empty buckets too: the other side may hold what we lack there
        for bucket in order:
            if listing and len(listing) + len(by_bucket[bucket]) > MAX_SYNC_ENTRIES:
                break
            listing.extend(by_bucket[bucket])
            listed.append(bucket)
        return [(sender, self._plain("sync-diff", b=listed, l=listing))]

    def _sync_diff(self, sender: str, listed: Any, listing: Any, now: float) -> list[Send]:
        """Their (member, incarnation) listing of the buckets that differ: we want what they hold newer
        and push what they lack or hold older."""
        if not (isinstance(listing, list) and isinstance(listed, list)):
            self.refused["malformed listings"] += 1
            return []
        buckets = {b for b in listed[:BUCKETS] if _bounded_int(b, BUCKETS)}
        theirs: dict[int, int] = {}
        for item in listing[:MAX_SYNC_ENTRIES]:
            valid = isinstance(item, list) and len(item) == 3 and _bounded_int(item[0], 2**64)
            if valid and _bounded_int(item[1], 2**63):
                theirs[item[0]] = item[1]
        mine = {_hid(p): e for p, e in self._table.items() if _hid(p) % BUCKETS in buckets}
        forgotten = {_hid(p): inc for p, inc in self.forgotten.items()}
        want = [
            hid
            for hid, inc in theirs.items()
            if (hid not in mine or mine[hid].heartbeat < inc) and forgotten.get(hid, -1) < inc
        ]
        push = [e.wire() for hid, e in mine.items() if theirs.get(hid, -1) < e.heartbeat]
        if not want and not push:
            return []
        return [(sender, self._plain("sync-push", e=push[:MAX_SYNC_ENTRIES], w=want[:MAX_SYNC_ENTRIES]))]

    def _sync_push(self, sender: str, entries: Any, want: Any, now: float) -> list[Send]:
        self._take_entries(entries, sender, now)
        if not isinstance(want, list) or not want:
            return []
        wanted = {h for h in want[:MAX_SYNC_ENTRIES] if _bounded_int(h, 2**64)}
        found = [e.wire() for p, e in self._table.items() if _hid(p) in wanted]
        return [(sender, self._plain("sync-entries", e=found))] if found else []

    def _take_entries(self, entries: Any, sender: str, now: float) -> int:
        if not isinstance(entries, list):
            return 0
        return sum(self._take_entry(raw, sender, now, rumor=False) for raw in entries[:MAX_SYNC_ENTRIES])

    # --- helpers ----------------------------------------------------------------------------------
    def _store(self, entry: MembershipEntry) -> None:
        self._table.put(entry)
        value = _version_hash(entry.peer_id, entry.heartbeat, entry.left)
        self._buckets[_hid(entry.peer_id) % BUCKETS] ^= value
        self._fingerprint ^= value

    def _unhash(self, entry: MembershipEntry) -> None:
        value = _version_hash(entry.peer_id, entry.heartbeat, entry.left)
        self._buckets[_hid(entry.peer_id) % BUCKETS] ^= value
        self._fingerprint ^= value

    def _forget(self, peer_id: str) -> None:
        entry = self._table.get(peer_id)
        if entry is None or peer_id == self.peer_id:
            return
        self._unhash(entry)
        self._table.remove(peer_id)
        self.suspects.pop(peer_id, None)
        self._rumors.pop(("e", peer_id), None)
        self.forgotten[peer_id] = entry.heartbeat
        self.forgotten.move_to_end(peer_id)
        while len(self.forgotten) > MAX_FORGOTTEN:
            self.forgotten.popitem(last=False)

    def _enqueue(self, key: tuple[str, str], item: dict[str, Any]) -> None:
        self._rumors[key] = [item, 0]

    def _piggyback(self) -> list[dict[str, Any]]:
        if not self._rumors:
            return []
        limit = retransmits(len(self._table))
        chosen = sorted(self._rumors.items(), key=lambda kv: kv[1][1])[:MAX_PIGGYBACK]
        for key, slot in chosen:
            slot[1] += 1
            if slot[1] >= limit:
                del self._rumors[key]
        return [slot[0] for _, slot in chosen]

    def _message(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A probe message, with the updates it carries."""
        updates = self._piggyback()
        return {"t": kind, **fields, **({"u": updates} if updates else {})}

    def _plain(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"t": kind, **fields}

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _is_candidate(self, peer_id: str) -> bool:
        entry = self._table.get(peer_id)
        return peer_id != self.peer_id and entry is not None and not entry.left

    def _random_member(self) -> str | None:
        return self._table.random_id(self.rng, self._is_candidate)

    def _random_members(self, count: int, exclude: tuple[str, ...]) -> list[str]:
        chosen: list[str] = []
        for _ in range(4 * count):
            if len(chosen) == count:
                break
            peer_id = self._random_member()
            if peer_id is None:
                break
            if peer_id not in chosen and peer_id not in exclude:
                chosen.append(peer_id)
        return chosen
