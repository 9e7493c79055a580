"""Relays, in the manner of libp2p circuit relay v2: reservations, limited circuits, secure end to end.

A public peer serves `/shoal/relay/hop/1.0.0`. A private peer B reserves a slot there (RESERVE) and keeps
its connection to the relay open; it is then reachable at `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<B>`.
A peer A opens a hop stream and asks to CONNECT to B; the relay opens `/shoal/relay/stop/1.0.0` to B,
and once B accepts it splices the two streams. A and B run the Host's whole Noise + yamux upgrade over
the spliced pipe, so the relay forwards ciphertext it cannot read or alter.

Limits, as circuit v2 has them: a cap on reservations (each with a lifetime), a cap on circuits (in all
and per peer), and per circuit a byte budget and a duration. A circuit that reaches either is reset:
relays never carry more than they offered, and bulk transfers are meant to move to a punched path.

Messages are length-prefixed msgpack maps with a version field (`transport.messages`), at most 4 KiB.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LimitError, ProtocolError, TransportError
from ..host import Host, Stream
from ..identity import PeerID
from ..messages import MessageError, read_message, write_message
from ..multiaddr import Multiaddr
from .conduit import StreamTransport, attach

log = logging.getLogger(__name__)

HOP_PROTOCOL = "/shoal/relay/hop/1.0.0"
STOP_PROTOCOL = "/shoal/relay/stop/1.0.0"
VERSION = 1
# Control messages carry a peer id, a few addresses and limits: 4 KiB is plenty and bounds a hostile one.
MAX_RELAY_MESSAGE = 4096
# How long either end may take to answer a relay request; the relay itself answers locally.
RELAY_REQUEST_TIMEOUT_S = 5.0
# Bytes copied per read while splicing: one yamux frame's worth at most, so memory per circuit is bounded.
SPLICE_CHUNK = 256 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """What a relay offers. libp2p's defaults (128 reservations, 2 min / 128 KiB circuits) suit signalling
    only; Shoal's relay must also carry a round's payload between two symmetric NATs, so circuits get
    more bytes, and the cap on circuits keeps the relay's own uplink usable."""

    # Reservations held at once; each costs a map entry and a kept-open connection.
    max_reservations: int = 128
    # A reservation lapses after this long unless renewed (libp2p: 1 hour).
    reservation_ttl_s: float = 3600.0
    # Circuits open at once through this relay, and per peer (source or destination).
    max_circuits: int = 64
    max_circuits_per_peer: int = 4
    # Bytes one circuit may carry (both directions together) before it is reset.
    circuit_bytes: int = 256 * 1024 * 1024
    # Seconds one circuit may stay open before it is reset.
    circuit_duration_s: float = 600.0


@dataclass
class Reservation:
    """What a private peer holds at one relay."""

    relay: PeerID
    relay_addrs: list[Multiaddr]
    expires_at: float
    circuit_bytes: int
    circuit_duration_s: float

    def relayed_addrs(self, me: PeerID) -> list[Multiaddr]:
        return [circuit_addr(addr, self.relay, me) for addr in self.relay_addrs]


def circuit_addr(relay_addr: Multiaddr, relay: PeerID, target: PeerID) -> Multiaddr:
    base = relay_addr.without_peer_id().parts
    return Multiaddr((*base, ("p2p", str(relay)), ("p2p-circuit", ""), ("p2p", str(target))))


def split_circuit_addr(addr: Multiaddr) -> tuple[Multiaddr, PeerID, PeerID] | None:
    """(relay's address, relay, target) of a circuit address, or None if `addr` is not one."""
    names = [name for name, _ in addr.parts]
    if "p2p-circuit" not in names:
        return None
    cut = names.index("p2p-circuit")
    before, after = addr.parts[:cut], addr.parts[cut + 1 :]
    if not before or before[-1][0] != "p2p" or len(after) != 1 or after[0][0] != "p2p":
        return None
    relay = PeerID.from_string(before[-1][1])
    return Multiaddr(before[:-1]), relay, PeerID.from_string(after[0][1])


class RelayError(TransportError):
    """A relay refused or could not complete a reservation or circuit."""


# ---------------------------------------------------------------------- the relay (public peers)


@dataclass
class RelayService:
    """Serves the hop protocol on `host`; `announce` lists the public addresses reservations give out."""

    host: Host
    limits: RelayLimits = field(default_factory=RelayLimits)
    announce: list[Multiaddr] = field(default_factory=list)
    reservations: dict[PeerID, float] = field(default_factory=dict)
    circuits: int = 0
    _per_peer: dict[PeerID, int] = field(default_factory=dict)
    bytes_relayed: int = 0
    circuits_cut: int = 0

    def __post_init__(self) -> None:
        self.host.set_stream_handler(HOP_PROTOCOL, self._serve_hop)

    async def _serve_hop(self, stream: Stream) -> None:
        try:
            async with asyncio.timeout(RELAY_REQUEST_TIMEOUT_S):
                request = await read_message(stream, MAX_RELAY_MESSAGE)
        except (TimeoutError, MessageError, asyncio.IncompleteReadError) as exc:
            who = stream.remote_peer_id.short()
            log.info("relay: dropping hop request from %s: %s", who, exc or "timeout")
            await stream.reset()
            return
        kind = request.get("type")
        if request.get("v") != VERSION or kind not in ("reserve", "connect"):
            await _refuse(stream, f"unknown request {kind!r} (version {request.get('v')!r})")
            return
        if kind == "reserve":
            await self._reserve(stream)
        else:
            await self._connect(stream, request)

    def _expire(self) -> None:
        now = time.monotonic()
        for peer, expires in list(self.reservations.items()):
            if expires < now or not self.host.is_connected(peer):
                del self.reservations[peer]

    async def _reserve(self, stream: Stream) -> None:
        peer = stream.remote_peer_id
        self._expire()
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            log.warning("relay: refusing reservation of %s: %d held", peer.short(), len(self.reservations))
            await _refuse(stream, f"relay holds its maximum of {self.limits.max_reservations} reservations")
            return
        self.reservations[peer] = time.monotonic() + self.limits.reservation_ttl_s
        addrs = self.announce or self.host.listen_addrs
        await write_message(
            stream,
            {
                "v": VERSION,
                "status": "ok",
                "ttl_s": self.limits.reservation_ttl_s,
                "addrs": [a.to_bytes() for a in addrs],
                "circuit_bytes": self.limits.circuit_bytes,
                "circuit_duration_s": self.limits.circuit_duration_s,
            },
        )
        await stream.close()
        log.info("relay: reservation for %s (%d held)", peer.short(), len(self.reservations))

    async def _connect(self, stream: Stream, request: dict[str, Any]) -> None:
        source = stream.remote_peer_id
        try:
            target = PeerID.from_bytes(request["peer"])
        except (KeyError, TypeError, ValueError, ProtocolError):
            await _refuse(stream, "connect request names no valid peer")
            return
        self._expire()
        if target not in self.reservations:
            await _refuse(stream, f"{target.short()} holds no reservation at this relay")
            return
        if self.circuits >= self.limits.max_circuits or any(
            self._per_peer.get(p, 0) >= self.limits.max_circuits_per_peer for p in (source, target)
        ):
            log.warning("relay: refusing circuit %s -> %s: circuit limit", source.short(), target.short())
            await _refuse(stream, "relay is at its circuit limit; retry later or use another relay")
            return
        self._open(source, target)
        try:
            try:
                async with asyncio.timeout(RELAY_REQUEST_TIMEOUT_S):
                    stop = await self.host.new_stream(target, STOP_PROTOCOL)
                    await write_message(
                        stop,
                        {
                            "v": VERSION,
                            "type": "connect",
                            "peer": source.multihash,
                            "circuit_bytes": self.limits.circuit_bytes,
                            "circuit_duration_s": self.limits.circuit_duration_s,
                        },
                    )
                    reply = await read_message(stop, MAX_RELAY_MESSAGE)
            except (TimeoutError, TransportError, asyncio.IncompleteReadError) as exc:
                await _refuse(stream, f"{target.short()} did not accept the circuit: {exc or 'timeout'}")
                return
            if reply.get("status") != "ok":
                await stop.reset()
                await _refuse(stream, f"{target.short()} refused the circuit: {reply.get('reason')!r}")
                return
            await write_message(stream, {"v": VERSION, "status": "ok"})
            log.info("relay: circuit %s -> %s open", source.short(), target.short())
            await self._splice(stream, stop)
        finally:
            self._close(source, target)

    def _open(self, *peers: PeerID) -> None:
        self.circuits += 1
        for peer in peers:
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1

    def _close(self, *peers: PeerID) -> None:
        self.circuits -= 1
        for peer in peers:
            left = self._per_peer.get(peer, 1) - 1
            if left:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    async def _splice(self, a: Stream, b: Stream) -> None:
        """Copy both ways until both sides close, the byte budget is spent or the duration is over."""
        budget = [self.limits.circuit_bytes]

        async def pump(src: Stream, dst: Stream) -> None:
            while data := await src.read(SPLICE_CHUNK):
                budget[0] -= len(data)
                if budget[0] < 0:
                    raise LimitError(f"circuit passed its {self.limits.circuit_bytes} byte limit")
                await dst.write(data)
                self.bytes_relayed += len(data)
            await dst.close()

        try:
            async with asyncio.timeout(self.limits.circuit_duration_s), asyncio.TaskGroup() as group:
                group.create_task(pump(a, b))
                group.create_task(pump(b, a))
        except* (TimeoutError, LimitError) as cut:
            self.circuits_cut += 1
            log.info(
                "relay: cutting circuit %s <-> %s: %s",
                a.remote_peer_id.short(),
                b.remote_peer_id.short(),
                cut.exceptions[0] or "duration limit",
            )
        except* TransportError as failed:
            log.info("relay: circuit ended: %s", failed.exceptions[0])
        await a.reset()
        await b.reset()


async def _refuse(stream: Stream, reason: str) -> None:
    log.info("relay: refusing %s: %s", stream.remote_peer_id.short(), reason)
    try:
        await write_message(stream, {"v": VERSION, "status": "refused", "reason": reason})
        await stream.close()
    except TransportError:
        await stream.reset()


# ---------------------------------------------------------------------- clients (private peers)


async def reserve(host: Host, relay_addr: Multiaddr | str) -> Reservation:
    """Reserve a slot at the relay at `relay_addr` (which names its /p2p/ id)."""
    addr = Multiaddr.parse(relay_addr)
    relay = addr.peer_id
    if relay is None:
        raise RelayError(f"relay address {addr} names no /p2p/ peer id")
    stream = await host.new_stream(relay, HOP_PROTOCOL, [addr])
    try:
        async with asyncio.timeout(RELAY_REQUEST_TIMEOUT_S):
            await write_message(stream, {"v": VERSION, "type": "reserve"})
            reply = await read_message(stream, MAX_RELAY_MESSAGE)
    except (TimeoutError, MessageError, asyncio.IncompleteReadError) as exc:
        await stream.reset()
        raise RelayError(f"relay {relay.short()} did not answer our reservation: {exc or 'timeout'}") from exc
    await stream.close()
    if reply.get("status") != "ok":
        raise RelayError(f"relay {relay.short()} refused our reservation: {reply.get('reason')!r}")
    try:
        announced = [Multiaddr.from_bytes(raw) for raw in reply["addrs"]][:16]
        # A relay listening on 0.0.0.0 announces just that; the address we reached it at works at least
        # from here, so it stands in for (and after) the ones that cannot be dialed.
        addrs = [a for a in announced if a.parts[0][1] not in ("0.0.0.0", "::")]
        if addr.without_peer_id() not in addrs:
            addrs.append(addr.without_peer_id())
        return Reservation(
            relay=relay,
            relay_addrs=addrs,
            expires_at=time.monotonic() + float(reply["ttl_s"]),
            circuit_bytes=int(reply["circuit_bytes"]),
            circuit_duration_s=float(reply["circuit_duration_s"]),
        )
    except (KeyError, TypeError, ValueError, TransportError) as exc:
        raise RelayError(f"relay {relay.short()} sent a malformed reservation: {exc}") from exc


async def dial_relayed(host: Host, addr: Multiaddr | str) -> Any:
    """A secure connection to the target of circuit address `addr`, through its relay."""
    parts = split_circuit_addr(Multiaddr.parse(addr))
    if parts is None:
        raise RelayError(f"{addr} is not a circuit address (…/p2p/<relay>/p2p-circuit/p2p/<target>)")
    relay_addr, relay, target = parts
    stream = await host.new_stream(relay, HOP_PROTOCOL, [relay_addr.with_peer_id(relay)])
    try:
        async with asyncio.timeout(RELAY_REQUEST_TIMEOUT_S):
            await write_message(stream, {"v": VERSION, "type": "connect", "peer": target.multihash})
            reply = await read_message(stream, MAX_RELAY_MESSAGE)
    except (TimeoutError, MessageError, asyncio.IncompleteReadError) as exc:
        await stream.reset()
        raise RelayError(f"relay {relay.short()} did not open a circuit to {target.short()}: {exc}") from exc
    if reply.get("status") != "ok":
        await stream.reset()
        reason = reply.get("reason")
        raise RelayError(f"relay {relay.short()} refused a circuit to {target.short()}: {reason!r}")
    return await attach(host, StreamTransport(stream, "relay"), initiator=True, expected=target, path="relay")


class StopHandler:
    """Accepts circuits from the relays this peer holds reservations at (others are refused)."""

    def __init__(self, host: Host, on_connection: Callable[[Any], None] | None = None) -> None:
        self.host = host
        self.relays: set[PeerID] = set()
        self.on_connection = on_connection
        host.set_stream_handler(STOP_PROTOCOL, self._serve)

    async def _serve(self, stream: Stream) -> None:
        relay = stream.remote_peer_id
        try:
            async with asyncio.timeout(RELAY_REQUEST_TIMEOUT_S):
                request = await read_message(stream, MAX_RELAY_MESSAGE)
            source = PeerID.from_bytes(request["peer"])
        except (
            TimeoutError,
            MessageError,
            asyncio.IncompleteReadError,
            KeyError,
            TypeError,
            ProtocolError,
        ) as exc:
            log.info("dropping a circuit offer from %s: %s", relay.short(), exc or "timeout")
            await stream.reset()
            return
        if relay not in self.relays:
            await _refuse(stream, f"we hold no reservation at {relay.short()}")
            return
        await write_message(stream, {"v": VERSION, "status": "ok"})
        conn = await attach(
            self.host, StreamTransport(stream, "relay"), initiator=False, expected=source, path="relay"
        )
        log.info("accepted a relayed connection from %s via %s", source.short(), relay.short())
        if self.on_connection is not None:
            self.on_connection(conn)
        await conn.closed  # the circuit lives as long as this handler: Host.close() cancels both
