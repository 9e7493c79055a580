"""Which path reaches a partner, and why: direct, then punched, then relayed; and what each one measures.

`NatService` is the NAT layer a daemon runs beside its Host:

- `start()` serves STUN (public peers), dial-backs, relaying (public peers) and the stop and punch
  sides; connects to the configured relays, learns its reachability from them, and when it is not public
  reserves a slot on every relay (two or more in production). `addrs()` is what to publish in the DHT:
  public addresses when reachable, relayed (`/p2p-circuit`) addresses otherwise.
- `connect(peer, addrs)` tries each direct address under its own deadline, then a relayed address; over
  a relayed connection it punches at once, and keeps the relay only when the punch fails. `upgrade(peer)`
  retries the punch later. Bulk transfers therefore use a relay only when no direct path exists, and the
  relay's own limits cut a circuit that carries more than it offered.
- `report()` lists, per partner, the path in use, why, its round-trip time and its measured throughput
  (`record_transfer` feeds it), for the daemon's logs and status.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TransportError
from ..host import Host
from ..identity import PeerID
from ..multiaddr import Multiaddr
from . import conduit, holepunch, ice, reachability, relay, stun

log = logging.getLogger(__name__)

DIRECT, TCP_PUNCH, ICE, RELAY = "direct", "tcp-punch", "ice", "relay"
# One direct dial: a reachable peer answers within a few RTTs; an unreachable one silently drops our SYN,
# and the next path should start long before the Host's own 10 s handshake timeout.
DIRECT_DIAL_TIMEOUT_S = 2.0
# How long a replaced relayed connection may finish what it carries before it is closed.
RELAY_GRACE_S = 1.0
# How often `maintain()` runs: keeps connections to relays alive (the Host closes connections idle for
# 300 s, which would drop a reservation), renews reservations at half their lifetime, forgets paths whose
# connection died, and retries punches for partners still on a relay.
MAINTAIN_INTERVAL_S = 30.0
# A relayed partner is punched again at most this often: a punch costs a few RTTs and two STUN queries.
UPGRADE_RETRY_S = 60.0
# A reservation is renewed when less than this is left of it: several maintenance rounds of slack.
RENEW_MARGIN_S = 4 * MAINTAIN_INTERVAL_S
# Throughput is a moving average over recent transfers: a new sample weighs this much.
THROUGHPUT_EWMA = 0.3
# Transfers shorter than this say more about latency than about throughput; they are not sampled.
MIN_SAMPLE_BYTES = 64 * 1024
DOCUMENTATION_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")


@dataclass(frozen=True)
class NatConfig:
    """How a peer meets NATs. `relays` name their /p2p/ ids; `stun_servers` are (ip, port)."""

    relays: tuple[Multiaddr, ...] = ()
    stun_servers: tuple[tuple[str, int], ...] = ()
    # Public peers serve STUN on this port (UDP and TCP), and relaying.
    serve_stun_port: int | None = None
    serve_stun_host: str = "0.0.0.0"
    serve_relay: bool = False
    relay_limits: relay.RelayLimits = field(default_factory=relay.RelayLimits)
    # Punch right away when a connection comes up relayed; `maintain()` retries later either way.
    punch: bool = True
    # Ways to replace a relay, tried in this order: "tcp" (simultaneous open), "ice" (UDP via aiortc).
    punch_methods: tuple[str, ...] = ("tcp", "ice")
    # TURN servers for ICE as (ip, port, user, password); STUN for ICE comes from `stun_servers`.
    turn_servers: tuple[tuple[str, int, str, str], ...] = ()
    # Punch in a background task instead of inside `connect()`: the caller (the daemon) gets the relayed
    # path at once and uses it until the punch replaces it. The dialer of the relayed connection starts
    # it when it is public (a connection reversal) or has the smaller peer id, so two NATed partners that
    # dial each other at once do not punch twice; `maintain()` retries either side later.
    punch_in_background: bool = False

    def ice_servers(self) -> ice.IceServers | None:
        if "ice" not in self.punch_methods or not (self.stun_servers or self.turn_servers):
            return None
        return ice.IceServers(self.stun_servers, self.turn_servers)


@dataclass
class PathInfo:
    peer: PeerID
    path: str
    reason: str
    since: float = field(default_factory=time.monotonic)
    rtt_s: float | None = None
    mb_s: float | None = None
    connect_s: float | None = None
    last_attempt: float = field(default=float("-inf"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": str(self.peer),
            "path": self.path,
            "reason": self.reason,
            "rtt_s": self.rtt_s,
            "mb_s": self.mb_s,
            "connect_s": self.connect_s,
        }


class NatService:
    def __init__(self, host: Host, config: NatConfig) -> None:
        self.host = host
        self.config = config
        self.reachability = reachability.Reachability()
        self.reservations: list[relay.Reservation] = []
        # Relays in use: the configured ones, and any added later (`add_relay`); `maintain()` keeps them.
        self.relays: list[Multiaddr] = list(config.relays)
        self.paths: dict[PeerID, PathInfo] = {}
        self._stun: stun.StunResponder | None = None
        self.relay_service: relay.RelayService | None = None
        self._stop = relay.StopHandler(host, self._relayed_by_peer)
        self._locks: dict[PeerID, asyncio.Lock] = {}
        self._autonat = reachability.AutoNatServer(host)
        stun_servers = list(config.stun_servers)
        self._punch = holepunch.PunchResponder(
            host, stun_servers, self._punched_by_peer, config.ice_servers()
        )
        self._closers: set[asyncio.Task[None]] = set()
        self._punches: dict[PeerID, asyncio.Task[Any]] = {}

    # ------------------------------------------------------------------ start-up

    async def start(self) -> None:
        config = self.config
        if config.serve_stun_port is not None:
            self._stun = await stun.StunResponder.start(config.serve_stun_host, config.serve_stun_port)
        if config.serve_relay:
            announce = [a for a in self.host.listen_addrs if _is_public(a)]
            self.relay_service = relay.RelayService(self.host, config.relay_limits, announce)
        relays = []
        for addr in config.relays:
            try:
                relays.append(await self.host.connect(addr))
            except TransportError as exc:
                log.warning("cannot reach relay %s: %s", addr, exc)
        if relays:
            self.reachability = await reachability.check(self.host, relays)
        if self.reachability.status != reachability.PUBLIC:
            for addr in config.relays:
                try:
                    reservation = await relay.reserve(self.host, addr)
                except TransportError as exc:
                    log.warning("no reservation at relay %s: %s", addr, exc)
                    continue
                self._stop.relays.add(reservation.relay)
                self.reservations.append(reservation)

    async def add_relay(self, addr: Multiaddr) -> bool:
        """Reserve a slot on one more relay (`addr` names its /p2p/ id), e.g. a peer we learned is behind
        a NAT after joining; False, with a log line, when the relay refuses or does not answer."""
        try:
            reservation = await relay.reserve(self.host, addr)
        except TransportError as exc:
            log.info("no reservation at %s: %s", addr, exc)
            return False
        self._stop.relays.add(reservation.relay)
        self.reservations.append(reservation)
        if addr not in self.relays:
            self.relays.append(addr)
        return True

    def addrs(self) -> list[Multiaddr]:
        """The addresses to publish for this peer: reachable ones first, then relayed ones."""
        me = self.host.peer_id
        out = [a.with_peer_id(me) for a in self.reachability.public_addrs]
        if self.reachability.status == reachability.PUBLIC or not self.relays:
            listening = [a.with_peer_id(me) for a in self.host.listen_addrs if _is_public(a)]
            out += [a for a in listening if a not in out]
        for reservation in self.reservations:
            out += reservation.relayed_addrs(me)
        return out

    # ------------------------------------------------------------------ connecting

    async def connect(self, peer: PeerID, addrs: Sequence[Multiaddr | str]) -> PathInfo:
        """The best path to `peer` among `addrs` (its published addresses); TransportError if none works.

        Calls for one peer run one at a time, and a connection that already exists (the peer may have
        dialed us first, as both partners of a round do) is kept rather than duplicated."""
        lock = self._locks.setdefault(peer, asyncio.Lock())
        async with lock:
            return await self._connect(peer, addrs)

    async def _connect(self, peer: PeerID, addrs: Sequence[Multiaddr | str]) -> PathInfo:
        started = time.monotonic()
        current = conduit.connection_to(self.host, peer)
        if current is not None:
            info = self.paths.get(peer)
            if info is None or info.path != conduit.path_of(current):
                info = self._set(peer, conduit.path_of(current), "already connected", started)
            if info.path == RELAY and self.config.punch and info.last_attempt == float("-inf"):
                await self._punch_soon(peer, info, started)
            return self.paths.get(peer, info)
        parsed = []
        for text in addrs:  # published by the peer, relayed by others: one bad address spoils no other
            try:
                parsed.append(Multiaddr.parse(text))
            except TransportError as exc:
                log.info("skipping an address of %s: %s", peer.short(), exc)
        direct = [a for a in parsed if relay.split_circuit_addr(a) is None]
        relayed = [a for a in parsed if relay.split_circuit_addr(a) is not None]
        errors = []
        for addr in direct:
            try:
                async with asyncio.timeout(DIRECT_DIAL_TIMEOUT_S):
                    await self.host.connect(addr.with_peer_id(peer))
            except (TimeoutError, TransportError) as exc:
                errors.append(f"{addr}: {exc or 'timed out'}")
                continue
            return self._set(peer, DIRECT, f"dialed {addr}", started)
        for addr in relayed:
            try:
                await relay.dial_relayed(self.host, addr)
            except TransportError as exc:
                errors.append(f"{addr}: {exc}")
                continue
            info = self._set(peer, RELAY, f"no direct address answered; relayed via {addr}", started)
            if self.config.punch:
                await self._punch_soon(peer, info, started)
            return self.paths.get(peer, info)
        raise TransportError(f"no path to {peer.short()}: {'; '.join(errors) or 'no address given'}")

    async def _punch_soon(self, peer: PeerID, info: PathInfo, started: float | None) -> None:
        """Punch now (waiting for it), or in the background where the config says so."""
        if self.config.punch_in_background:
            self._punch_later(peer, info, started)
        else:
            info.last_attempt = time.monotonic()
            await self.upgrade(peer, started)

    def _punch_later(self, peer: PeerID, info: PathInfo, started: float | None) -> None:
        public = self.reachability.status == reachability.PUBLIC
        if peer in self._punches or (not public and self.host.peer_id.multihash > peer.multihash):
            return  # one punch at a time; a public dialer reverses, else the smaller id punches first
        info.last_attempt = time.monotonic()
        task = asyncio.get_running_loop().create_task(self.upgrade(peer, started))
        self._punches[peer] = task
        task.add_done_callback(lambda _: self._punches.pop(peer, None))

    async def upgrade(self, peer: PeerID, started: float | None = None) -> PathInfo | None:
        """Replace the relay to `peer` by a direct path: the peer dials us when we are reachable
        (connection reversal), else a TCP hole punch, else ICE over UDP; each under its own deadline.
        The relay stays when none works. ICE is skipped behind a symmetric NAT: without TURN it cannot
        get through either, and through TURN it is just another relay."""
        info = self.paths.get(peer)
        if info is None or info.path != RELAY:
            return info
        if self.reachability.status == reachability.PUBLIC and self.reachability.public_addrs:
            try:
                conn = await holepunch.reverse(self.host, peer, self.reachability.public_addrs)
            except TransportError as exc:
                log.info("connection reversal with %s failed: %s; punching", peer.short(), exc)
            else:
                self._switch(peer, conn, started)
                return self.paths[peer]
        failures = []
        symmetric = False
        for method in self.config.punch_methods:
            ice_servers = self.config.ice_servers()
            try:
                if method == "tcp":
                    conn = await holepunch.punch(self.host, peer, list(self.config.stun_servers))
                elif method == "ice" and ice_servers is not None and not symmetric:
                    conn = await holepunch.ice_punch(self.host, peer, ice_servers)
                else:
                    continue
            except TransportError as exc:
                symmetric = symmetric or getattr(exc, "symmetric", False)
                failures.append(f"{method}: {exc}")
                continue
            self._switch(peer, conn, started)
            return self.paths[peer]
        info.reason = f"no punch worked ({'; '.join(failures) or 'none enabled'}); staying relayed"
        log.info("path to %s stays relayed: %s", peer.short(), info.reason)
        return info

    def _relayed_by_peer(self, conn: Any) -> None:
        peer = conn.remote_peer_id
        if conduit.connection_to(self.host, peer) is conn:  # no better path to this peer yet
            self._set(peer, RELAY, "the peer reached us through a relay", time.monotonic()).connect_s = None

    def _punched_by_peer(self, conn: Any) -> None:
        self._switch(conn.remote_peer_id, conn, None)

    def _switch(self, peer: PeerID, conn: Any, started: float | None) -> None:
        old = conduit.connection_to(self.host, peer)
        conduit.prefer(self.host, conn)
        path = conduit.path_of(conn)
        how = {TCP_PUNCH: "TCP hole punch", ICE: "ICE (UDP)"}.get(path, "a direct dial (connection reversal)")
        if getattr(conn, "punch_mode", None):
            how += f" ({conn.punch_mode})"
        pair = conn.transport.get_extra_info("ice_pair") if conn.transport is not None else None
        if pair:
            how += f" (pair {pair}{', through TURN' if 'relay' in pair else ''})"
        info = PathInfo(peer, path, f"{how} to {conn.remote_addr or 'the peer'} replaced the relay")
        if started is not None:
            info.connect_s = time.monotonic() - started
        self.paths[peer] = info
        log.info("path to %s: %s (%s)", peer.short(), info.path, info.reason)
        if old is not None and old is not conn and conduit.path_of(old) == RELAY:
            task = asyncio.get_running_loop().create_task(self._close_later(old))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def _close_later(self, conn: Any) -> None:
        await asyncio.sleep(RELAY_GRACE_S)
        await conn.close()

    def _set(self, peer: PeerID, path: str, reason: str, started: float) -> PathInfo:
        info = PathInfo(peer, path, reason, connect_s=time.monotonic() - started)
        self.paths[peer] = info
        log.info("path to %s: %s (%s)", peer.short(), path, reason)
        return info

    # ------------------------------------------------------------------ measuring

    async def measure_rtt(self, peer: PeerID) -> float:
        rtt = await self.host.ping(peer)
        info = self.paths.get(peer)
        if info is not None:
            info.rtt_s = rtt
        return rtt

    def record_transfer(self, peer: PeerID, nbytes: int, seconds: float) -> None:
        info = self.paths.get(peer)
        if info is None or nbytes < MIN_SAMPLE_BYTES or seconds <= 0:
            return
        sample = nbytes / seconds / 1e6
        old = info.mb_s
        info.mb_s = sample if old is None else (1 - THROUGHPUT_EWMA) * old + THROUGHPUT_EWMA * sample

    def report(self) -> list[dict[str, Any]]:
        return [info.as_dict() for info in self.paths.values()]

    @property
    def stun_port(self) -> int | None:
        return self._stun.port if self._stun is not None else None

    async def maintain(self, interval_s: float = MAINTAIN_INTERVAL_S) -> None:
        """Run `maintain_once()` forever (the daemon runs this as one task of its TaskGroup)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.maintain_once()

    async def maintain_once(self) -> None:
        now = time.monotonic()
        for peer, info in list(self.paths.items()):
            if conduit.connection_to(self.host, peer) is None:
                log.info("path to %s (%s) is gone; the next connect chooses again", peer.short(), info.path)
                del self.paths[peer]
        for addr in self.relays:
            relay_id = addr.peer_id
            if relay_id is None:
                continue
            try:
                # A slot lives with its connection: one that was lost (and is redialed by the ping,
                # which also keeps it from idling out) needs a new reservation.
                was_connected = self.host.is_connected(relay_id)
                await self.host.ping(relay_id, [addr])
                held = next((r for r in self.reservations if r.relay == relay_id), None)
                stale = held is None or held.expires_at - now < RENEW_MARGIN_S or not was_connected
                if self.reachability.status != reachability.PUBLIC and stale:
                    fresh = await relay.reserve(self.host, addr)
                    self.reservations = [r for r in self.reservations if r.relay != relay_id] + [fresh]
                    self._stop.relays.add(fresh.relay)
            except TransportError as exc:
                log.warning("relay %s: %s", addr, exc)
        for peer, info in list(self.paths.items()):
            if info.path == RELAY and now - info.last_attempt >= UPGRADE_RETRY_S:
                info.last_attempt = now
                await self.upgrade(peer)

    async def close(self) -> None:
        tasks = [*self._closers, *self._punches.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stun is not None:
            self._stun.close()


def _is_public(addr: Multiaddr) -> bool:
    try:
        ip = ipaddress.ip_address(addr.parts[0][1])
    except ValueError:
        return True  # a DNS name: someone published it to be dialed
    return not (ip.is_private and not _is_documentation(ip)) and not ip.is_unspecified and not ip.is_loopback


def _is_documentation(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The lab's "internet" uses the documentation ranges (RFC 5737), which Python files as private."""
    return any(ip in ipaddress.ip_network(net) for net in DOCUMENTATION_NETS)
