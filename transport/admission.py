"""Who may hold the Host's connection slots: fair shares per address and identity, room kept for newcomers.

A stranger's TCP connection costs us a slot from its SYN until its Noise handshake ends (or the handshake
deadline passes), and an authenticated identity costs nothing to mint. So neither a full table of pending
handshakes nor a full table of connections may refuse an honest newcomer: the Host always admits the new
connection and, when a share is used up, evicts the oldest pending handshake of the same address (or /24,
/48 subnet), or the least useful connection of whoever holds the most. Honest handshakes end in
milliseconds and honest peers keep one connection each, so what is evicted is what squats.

Pure bookkeeping, no sockets: the Host feeds it connections (anything with `remote_ip`, `streams`,
`last_active`, `remote_peer_id`) and closes what it names.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from typing import Generic, Protocol, TypeVar

from .limits import HostLimits


class Slot(Protocol):
    @property
    def remote_ip(self) -> str | None: ...

    @property
    def last_active(self) -> float: ...

    @property
    def streams(self) -> Mapping[int, object]: ...


S = TypeVar("S", bound=Slot)


def subnet_of(ip: str | None) -> str:
    """The /24 (IPv4) or /48 (IPv6) an address belongs to: what one home or one cloud tenant holds."""
    if ip is None:
        return "?"
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class PendingHandshakes(Generic[S]):
    """Inbound connections still in their handshake, oldest first."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._pending: dict[S, None] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, conn: S) -> tuple[S | None, str]:
        """Admits `conn`; returns a pending handshake to evict for it (or None) and why."""
        victim, why = self._victim(conn.remote_ip)
        if victim is not None:
            del self._pending[victim]
        self._pending[conn] = None
        return victim, why

    def done(self, conn: S) -> None:
        self._pending.pop(conn, None)

    def _victim(self, ip: str | None) -> tuple[S | None, str]:
        limits = self.limits
        same_ip = [c for c in self._pending if c.remote_ip == ip]
        if len(same_ip) >= limits.max_pending_handshakes_per_ip:
            return same_ip[0], "over the per-address cap on handshakes"
        subnet = subnet_of(ip)
        same_subnet = [c for c in self._pending if subnet_of(c.remote_ip) == subnet]
        if len(same_subnet) >= limits.max_pending_handshakes_per_subnet:
            return same_subnet[0], "over the per-subnet cap on handshakes"
        if len(self._pending) >= limits.max_pending_handshakes:
            heaviest, _ = Counter(c.remote_ip for c in self._pending).most_common(1)[0]
            return next(c for c in self._pending if c.remote_ip == heaviest), "handshake table full"
        return None, ""


def least_useful(conns: Iterable[S]) -> S | None:
    """The connection whose loss costs least: fewest open streams, then the longest idle."""
    return min(conns, key=lambda c: (len(c.streams), c.last_active), default=None)


def extra_connection(conns: Collection[S], keep: Collection[object], limits: HostLimits) -> S | None:
    """One connection of a single identity beyond its cap, to close (never one in `keep`), or None."""
    if len(conns) <= limits.max_connections_per_peer:
        return None
    return least_useful(c for c in conns if c not in keep)


def table_victim(conns: Iterable[S], keep: Collection[object], limits: HostLimits) -> S | None:
    """When the connection table is full: the least useful connection of the address holding the most,
    if that address holds more than its fair share (the table / FAIR_SHARE_DIVISOR); else None (refuse)."""
    candidates = [c for c in conns if c not in keep]
    counts = Counter(c.remote_ip for c in candidates)
    if not counts:
        return None
    heaviest, held = counts.most_common(1)[0]
    if held <= max(1, limits.max_connections // FAIR_SHARE_DIVISOR):
        return None
    return least_useful(c for c in candidates if c.remote_ip == heaviest)


# An address (a home, a NAT, one attacker) may hold 1/8 of the table before its connections are the first
# to go when someone new arrives: 32 of the default 256, room for a small lab or a shared NAT.
FAIR_SHARE_DIVISOR = 8
