"""Who is in the run, by gossiped heartbeats (van Renesse et al., "A Gossip-Style Failure Detection Service").

Each peer increments its own heartbeat counter; peers swap their tables and keep the highest counter
seen for every member. A member whose counter has not grown for `fail_after` seconds of *local* time
is presumed dead; one that announced it is leaving is dropped at once. No clocks are compared across
machines. Sans-I/O: the caller passes `now` and carries the tables over whatever transport it has.

This is the walking skeleton's membership; the signed CRDT run state (gossip/runstate) supersedes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A table from the network larger than this is refused whole: far above any run we expect, far below
# what would hurt to hold.
MAX_MEMBERS = 4096
MAX_FIELD_CHARS = 256
MAX_SELF_CLAIMS = 16  # addresses of would-be twins we bother to check
# Addresses one member may publish: its direct ones (LAN, public, observed) and one per relay it holds.
MAX_ADDRS = 8


@dataclass
class MembershipEntry:
    peer_id: str
    addrs: tuple[str, ...]  # best first: direct addresses, then relayed (/p2p-circuit) ones
    heartbeat: int
    round: int
    left: bool
    changed_at: float  # local time the heartbeat last grew
    ready: bool = False  # its worker has loaded the model and can train

    @property
    def addr(self) -> str:
        return self.addrs[0]


class Membership:
    def __init__(
        self, peer_id: str, addrs: str | list[str], now: float, fail_after: float = 5.0, incarnation: int = 0
    ):
        self.peer_id = peer_id
        self.fail_after = fail_after
        # A restarted peer must out-count the heartbeats its previous life left in others' tables, or they
        # would keep its old address: start from a number that only grows across restarts (the caller
        # passes the wall clock in milliseconds).
        self.members: dict[str, MembershipEntry] = {
            peer_id: MembershipEntry(
                peer_id, _as_tuple(addrs), heartbeat=incarnation + 1, round=0, left=False, changed_at=now
            )
        }
        # Addresses others gossip for our own id: a previous life of ours, or another daemon with our key.
        self.claims_of_self: set[str] = set()

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

    def leave(self) -> None:
        self.me.left = True
        self.me.heartbeat += 1

    def table(self) -> list[dict[str, Any]]:
        """What we tell others: every member we still believe in, and those that left (so it spreads)."""
        return [
            {
                "peer_id": m.peer_id,
                "addr": m.addr,  # for peers that read one address only
                "addrs": list(m.addrs),
                "heartbeat": m.heartbeat,
                "round": m.round,
                "left": m.left,
                "ready": m.ready,
            }
            for m in self.members.values()
        ]

    def merge(self, table: Any, now: float) -> list[str]:
        """Folds a received table in; returns the ids of members heard of for the first time.

        Malformed entries are dropped with a log line; a table that is not a bounded list is refused.
        """
        if not isinstance(table, list) or len(table) > MAX_MEMBERS:
            log.warning("dropped a membership table that is not a list of at most %d entries", MAX_MEMBERS)
            return []
        new = []
        for entry in table:
            parsed = _parse_entry(entry)
            if parsed is None:
                log.warning("dropped a malformed membership entry: %.200r", entry)
                continue
            peer_id, addrs, heartbeat, round_number, left, ready = parsed
            if peer_id == self.peer_id:
                if not left:
                    self._note_claims(addrs)
                continue  # only we speak for ourselves
            known = self.members.get(peer_id)
            if known is None:
                if len(self.members) >= MAX_MEMBERS:
                    continue
                self.members[peer_id] = MembershipEntry(
                    peer_id, addrs, heartbeat, round_number, left, now, ready
                )
                if not left:
                    new.append(peer_id)
            elif heartbeat > known.heartbeat:
                known.addrs, known.heartbeat, known.round, known.left = addrs, heartbeat, round_number, left
                known.ready = ready
                known.changed_at = now
        return new

    def _note_claims(self, addrs: tuple[str, ...]) -> None:
        """Direct addresses gossiped for our id that are not ours: a twin may listen there."""
        for addr in addrs:
            if addr in self.me.addrs or "/p2p-circuit" in addr or len(self.claims_of_self) >= MAX_SELF_CLAIMS:
                continue
            self.claims_of_self.add(addr)

    def is_live(self, peer_id: str, now: float) -> bool:
        member = self.members.get(peer_id)
        if member is None or member.left:
            return False
        return peer_id == self.peer_id or now - member.changed_at < self.fail_after

    def live(self, now: float) -> list[str]:
        return sorted(p for p in self.members if self.is_live(p, now))

    def forget_dead(self, now: float, keep_for: float = 60.0) -> None:
        """Drops members dead for long enough that nobody still gossips them back to life."""
        for peer_id, member in list(self.members.items()):
            if peer_id != self.peer_id and now - member.changed_at > self.fail_after + keep_for:
                del self.members[peer_id]

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


def _parse_entry(entry: Any) -> tuple[str, tuple[str, ...], int, int, bool, bool] | None:
    if not isinstance(entry, dict):
        return None
    peer_id, addr = entry.get("peer_id"), entry.get("addr")
    addrs = entry.get("addrs", [addr])
    heartbeat, round_number, left = entry.get("heartbeat"), entry.get("round"), entry.get("left")
    if not (isinstance(peer_id, str) and 0 < len(peer_id) <= MAX_FIELD_CHARS):
        return None
    if not isinstance(addrs, list) or not 0 < len(addrs) <= MAX_ADDRS:
        return None
    if not all(isinstance(a, str) and 0 < len(a) <= MAX_FIELD_CHARS for a in addrs):
        return None
    if not (isinstance(heartbeat, int) and isinstance(round_number, int) and isinstance(left, bool)):
        return None
    if heartbeat < 0 or round_number < 0:
        return None
    return peer_id, tuple(addrs), heartbeat, round_number, left, entry.get("ready") is True
