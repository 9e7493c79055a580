"""Who is in the run, by signed, gossiped heartbeats (van Renesse et al., "A Gossip-Style Failure
Detection Service", with every entry signed by the peer it is about).

Each peer increments its own heartbeat counter and signs its entry (addresses, heartbeat, round, ready,
left); peers swap their tables and keep, for every member, the entry with the highest heartbeat whose
signature checks against the member's own key (inlined in its peer id). A relay passes entries on as
they were signed, so nobody can speak for another peer: not mark it left, move its address, or invent
members it has no key for. A member whose counter has not grown for `fail_after` seconds of *local*
time is presumed dead; one that signed that it is leaving is dropped at once. No clocks are compared
for liveness; the signing time only bounds how old an entry may be when first heard of, so a dead
peer's last entry cannot be replayed into the run long after it left. Sans-I/O: the caller passes `now`
(and may pass the wall clock) and carries the tables over whatever transport it has.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack
from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.gossip.admission import MAX_TOKEN_BYTES, Admission
from shoal.transport.identity import PeerID, PublicKey, peer_id_from_key
from shoal.transport.identity_work import meets

# A table from the network larger than this is refused whole: far above any run we expect, far below
# what would hurt to hold.
MAX_MEMBERS = 4096
MAX_FIELD_CHARS = 256
MAX_SELF_CLAIMS = 16  # addresses of would-be twins we bother to check
# Addresses one member may publish: its direct ones (LAN, public, observed) and one per relay it holds.
MAX_ADDRS = 8
SIGNATURE_BYTES = 64  # Ed25519
# An entry first heard of must have been signed within this long (by our clock): honest entries are
# re-signed every heartbeat, so only replays and badly wrong clocks are older. Generous for clock skew.
MAX_ENTRY_AGE_S = 600.0
# Forgotten members are remembered this many at most, with the heartbeat they had, so a relay that
# still gossips their last entry cannot bring them back to life.
MAX_FORGOTTEN = 4096
SIGNING_DOMAIN = b"shoal-member/1"
VERIFY_ALLOWANCE = 64  # signature checks per table beyond two per member we hold (newcomers, a heal)


@dataclass
class MembershipEntry:
    peer_id: str
    addrs: tuple[str, ...]  # best first: direct addresses, then relayed (/p2p-circuit) ones
    heartbeat: int
    round: int
    left: bool
    changed_at: float  # local time the heartbeat last grew
    ready: bool = False  # its worker has loaded the model and can train
    signed_at_ms: int = 0  # the member's wall clock when it signed this entry
    signature: bytes = b""
    token: bytes | None = None  # its join token (gossip/admission.py), in a closed run
    work: int = 0  # the nonce that proves its identity's work (transport/identity_work.py)

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def signed_part(self, run_id: str) -> bytes:
        return msgpack.packb(
            [SIGNING_DOMAIN, run_id, self.peer_id, list(self.addrs), self.heartbeat, self.round,
             self.left, self.ready, self.signed_at_ms, self.token, self.work]
        )  # fmt: skip

    def wire(self) -> dict[str, Any]:
        extra = {} if self.token is None else {"token": self.token}
        return {
            **extra,
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "heartbeat": self.heartbeat,
            "round": self.round,
            "left": self.left,
            "ready": self.ready,
            "at": self.signed_at_ms,
            "sig": self.signature,
            "work": self.work,
        }


class Membership:
    def __init__(
        self,
        key: ed25519.Ed25519PrivateKey,
        run_id: str,
        addrs: str | list[str],
        now: float,
        fail_after: float = 5.0,
        incarnation: int = 0,
        wall_clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
        token: bytes | None = None,
        work_bits: int = 0,
        work: int = 0,
    ):
        self.key = key
        self.run_id = run_id
        self.peer_id = str(peer_id_from_key(key))
        self.fail_after = fail_after
        self.wall_clock = wall_clock
        self.admission = admission  # a closed run's door; None: an open run
        self.work_bits = work_bits  # the identity work every member must prove (0: none)
        # A restarted peer must out-count the heartbeats its previous life left in others' tables, or they
        # would keep its old address: start from a number that only grows across restarts (the caller
        # passes the wall clock in milliseconds).
        self.members: dict[str, MembershipEntry] = {
            self.peer_id: MembershipEntry(
                self.peer_id,
                _as_tuple(addrs),
                heartbeat=incarnation + 1,
                round=0,
                left=False,
                changed_at=now,
                token=token,
                work=work,
            )
        }
        # Addresses others gossip for our own id, signed with our key: a previous life of ours, or
        # another daemon with our key.
        self.claims_of_self: set[str] = set()
        self.forgotten: OrderedDict[str, int] = OrderedDict()  # peer id -> its heartbeat when forgotten
        # Entries refused since the caller last looked, by reason: the caller logs them at a bounded rate.
        self.refused: Counter[str] = Counter()
        self._keys: dict[str, PublicKey] = {}  # members' public keys, parsed once
        self._signed: tuple[Any, ...] | None = None  # the fields our current signature covers

    @property
    def me(self) -> MembershipEntry:
        return self.members[self.peer_id]

    def beat(self, now: float, round_number: int) -> None:
        self.me.heartbeat += 1
        self.me.round = round_number
        self.me.changed_at = now

    def set_addrs(self, addrs: list[str]) -> None:
        """Our addresses changed (a relay reservation came or went): the next heartbeat carries them."""
        self.me.addrs = _as_tuple(addrs)
        self.me.heartbeat += 1

    def set_ready(self) -> None:
        """Our worker has loaded the model: we may be paired from now on."""
        if not self.me.ready:
            self.me.ready = True
            self.me.heartbeat += 1

    def leave(self) -> None:
        self.me.left = True
        self.me.heartbeat += 1

    def table(self) -> list[dict[str, Any]]:
        """What we tell others: every member we still believe in, and those that left (so it spreads),
        each entry as its member signed it."""
        self._sign_own_entry()
        return [m.wire() for m in self.members.values()]

    def _sign_own_entry(self) -> None:
        me = self.me
        fields = (me.addrs, me.heartbeat, me.round, me.left, me.ready)
        if fields == self._signed:
            return  # signed once per change: a heartbeat, not a swap, costs a signature
        me.signed_at_ms = int(self.wall_clock() * 1000)
        me.signature = self.key.sign(me.signed_part(self.run_id))
        self._signed = fields

    def merge(self, table: Any, now: float) -> list[str]:
        """Folds a received table in; returns the ids of members heard of for the first time.

        An entry is taken only when it is newer than what we hold and its member signed it; the rest
        are counted in `refused` by reason (never logged one by one: a hostile table can hold
        thousands). A table that is not a bounded list is refused whole.
        """
        if not isinstance(table, list) or len(table) > MAX_MEMBERS:
            self.refused["a table that is not a list of at most 4096 entries"] += 1
            return []
        new = []
        wall_ms = self.wall_clock() * 1000
        # Signature checks cost ~0.1 ms each: a table buys a bounded number, one per member it lists.
        checks_left = 2 * len(self.members) + VERIFY_ALLOWANCE
        listed: set[str] = set()
        for raw in table:
            entry = _parse_entry(raw, now)
            if entry is None:
                self.refused["malformed entries"] += 1
                continue
            peer_id = entry.peer_id
            if peer_id in listed:
                self.refused["entries listed twice in one table"] += 1
                continue
            listed.add(peer_id)
            if peer_id == self.peer_id:
                self._note_claims(entry, wall_ms)  # only we speak for ourselves; a twin may be about
                continue
            known = self.members.get(peer_id)
            if known is not None and entry.heartbeat <= known.heartbeat:
                continue  # nothing new: the common case, and no signature to check
            if peer_id in self.forgotten and entry.heartbeat <= self.forgotten[peer_id]:
                continue  # the last words of a member we gave up on, still gossiped by someone
            if known is None and abs(wall_ms - entry.signed_at_ms) > MAX_ENTRY_AGE_S * 1000:
                self.refused["entries signed too long ago or in the future (a replay, or a wrong clock)"] += 1
                continue
            if not meets(peer_id, entry.work, self.work_bits):  # one hash: before the signature
                self.refused[f"entries without {self.work_bits} bits of identity work"] += 1
                continue
            if checks_left <= 0:
                self.refused["entries past the table's signature checks"] += 1
                continue
            checks_left -= 1
            if not self._signed_by_member(entry):
                self.refused["entries not signed by the member they describe"] += 1
                continue
            if self.admission is not None:
                why = self.admission.refuses(peer_id, entry.token, wall_ms / 1000)
                if why is not None:
                    self.refused[f"entries with {why} (this run is closed)"] += 1
                    continue
            self.forgotten.pop(peer_id, None)
            if known is None:
                if len(self.members) >= MAX_MEMBERS:
                    self.refused["entries past the member limit"] += 1
                    continue
                self.members[peer_id] = entry
                if not entry.left:
                    new.append(peer_id)
            else:
                self.members[peer_id] = entry
        return new

    def _signed_by_member(self, entry: MembershipEntry) -> bool:
        key = self._keys.get(entry.peer_id)
        if key is None:
            try:
                key = PeerID.from_string(entry.peer_id).public_key()
            except ValueError:
                return False  # not a peer id at all
            if key is None:
                return False  # a hashed id: its key is not in it, and we do not fetch keys for membership
            if entry.peer_id in self.members:
                self._keys[entry.peer_id] = key  # cached for members only: bounded by the table
        return key.verify(entry.signature, entry.signed_part(self.run_id))

    def _note_claims(self, entry: MembershipEntry, wall_ms: float) -> None:
        """Direct addresses gossiped for our id that are not ours, signed with our key: a previous life
        of ours, or a twin (another daemon with a copy of our key file) may listen there."""
        claims = [a for a in entry.addrs if a not in self.me.addrs and "/p2p-circuit" not in a]
        if entry.left or not claims or len(self.claims_of_self) >= MAX_SELF_CLAIMS:
            return  # nothing to check: our own entry coming back is the common case
        if abs(wall_ms - entry.signed_at_ms) > MAX_ENTRY_AGE_S * 1000 or not self._signed_by_member(entry):
            self.refused["entries for our own id not signed with our key"] += 1
            return
        self.claims_of_self.update(claims[: MAX_SELF_CLAIMS - len(self.claims_of_self)])

    def is_live(self, peer_id: str, now: float) -> bool:
        member = self.members.get(peer_id)
        if member is None or member.left:
            return False
        return peer_id == self.peer_id or now - member.changed_at < self.fail_after

    def live(self, now: float) -> list[str]:
        return sorted(p for p in self.members if self.is_live(p, now))

    def forget_dead(self, now: float, keep_for: float = 60.0) -> None:
        """Drops members dead for long enough that nobody still gossips them back to life, and remembers
        their last heartbeat so that anyone who still does is not believed."""
        for peer_id, member in list(self.members.items()):
            if peer_id != self.peer_id and now - member.changed_at > self.fail_after + keep_for:
                del self.members[peer_id]
                self._keys.pop(peer_id, None)
                self.forgotten[peer_id] = member.heartbeat
                self.forgotten.move_to_end(peer_id)
                while len(self.forgotten) > MAX_FORGOTTEN:
                    self.forgotten.popitem(last=False)

    def addr_of(self, peer_id: str) -> str | None:
        member = self.members.get(peer_id)
        return member.addr if member else None

    def addrs_of(self, peer_id: str) -> list[str]:
        member = self.members.get(peer_id)
        return list(member.addrs) if member else []

    def ready(self, now: float) -> list[str]:
        """Live members whose workers can train."""
        return [p for p in self.live(now) if self.members[p].ready]

    def highest_round(self, now: float) -> int:
        return max((self.members[p].round for p in self.live(now)), default=0)


def _as_tuple(addrs: str | list[str]) -> tuple[str, ...]:
    result = (addrs,) if isinstance(addrs, str) else tuple(addrs)
    if not result:
        raise ValueError("a member needs at least one address")
    return result[:MAX_ADDRS]


def _parse_entry(entry: Any, now: float) -> MembershipEntry | None:
    """The entry's fields, checked for type and size (the signature is checked by the caller)."""
    if not isinstance(entry, dict):
        return None
    peer_id, addrs, signature = entry.get("peer_id"), entry.get("addrs"), entry.get("sig")
    heartbeat, round_number, left = entry.get("heartbeat"), entry.get("round"), entry.get("left")
    ready, signed_at, token = entry.get("ready"), entry.get("at"), entry.get("token")
    work = entry.get("work", 0)
    if not (isinstance(peer_id, str) and 0 < len(peer_id) <= MAX_FIELD_CHARS):
        return None
    if not isinstance(addrs, list) or not 0 < len(addrs) <= MAX_ADDRS:
        return None
    if not all(isinstance(a, str) and 0 < len(a) <= MAX_FIELD_CHARS for a in addrs):
        return None
    if not (
        _bounded_int(heartbeat, 2**63)
        and _bounded_int(round_number, 2**40)
        and _bounded_int(signed_at, 2**63)
        and _bounded_int(work, 2**64)
    ):
        return None
    if not (isinstance(left, bool) and isinstance(ready, bool)):
        return None
    if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        return None
    if not (token is None or (isinstance(token, bytes) and len(token) <= MAX_TOKEN_BYTES)):
        return None
    return MembershipEntry(
        peer_id, tuple(addrs), heartbeat, round_number, left, changed_at=now, ready=ready,
        signed_at_ms=signed_at, signature=signature, token=token, work=work,
    )  # fmt: skip


def _bounded_int(value: Any, limit: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit
