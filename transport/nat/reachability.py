"""Reachability, in the manner of libp2p AutoNAT: ask peers to dial us back, and learn what we are.

A peer that wants to know whether others can reach it opens `/shoal/autonat/1.0.0` to a few connected
peers and sends its candidate addresses: its listen ports on the IP those peers observed (identify's
observed address), as libp2p's address translation does. The server dials each candidate with a fresh
connection, from a new port, and says whether the secure handshake completed and proved the right peer.

Only addresses on the IP the request came from are dialed (AutoNAT's rule): a server must never become
a tool for making connections to third parties. Each dial-back has its own deadline and the number in
flight at once is capped.

The verdict: `public` when any server reached us, `private` (behind a NAT) when none did and the
observed IP is not ours, `firewalled` when none did although the observed IP is one of our own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..errors import TransportError
from ..host import Host, Stream
from ..identity import PeerID
from ..messages import MessageError, read_message, write_message
from ..multiaddr import Multiaddr

log = logging.getLogger(__name__)

PROTOCOL = "/shoal/autonat/1.0.0"
VERSION = 1
MAX_MESSAGE = 4096
# Candidates a server dials per request: a peer has a handful of listen ports, not dozens.
MAX_CANDIDATES = 8
# One dial-back (TCP connect + Noise + muxer: about 3 RTTs, under 1 s across the internet, but a busy
# 2-core peer can take seconds to finish a handshake; libp2p allows 15 s). A miss makes a reachable peer
# look firewalled, so the deadline is generous; behind a NAT the dial-back costs this long once.
DIAL_BACK_TIMEOUT_S = 4.0
# Requests one server serves at once (each dials up to MAX_CANDIDATES); more wait: bounded work.
MAX_CONCURRENT_DIAL_BACKS = 8
# A client waits this long for the server's verdict: the dial-back deadlines plus a margin.
REQUEST_TIMEOUT_S = DIAL_BACK_TIMEOUT_S * 2 + 2.0

PUBLIC, PRIVATE, FIREWALLED, UNKNOWN = "public", "private", "firewalled", "unknown"


@dataclass
class Reachability:
    status: str = UNKNOWN
    observed: Multiaddr | None = None
    public_addrs: list[Multiaddr] = field(default_factory=list)
    confirmations: int = 0
    failures: int = 0


class AutoNatServer:
    """Serves dial-back requests on `host`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)
        host.set_stream_handler(PROTOCOL, self._serve)

    async def _serve(self, stream: Stream) -> None:
        peer = stream.remote_peer_id
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = await read_message(stream, MAX_MESSAGE)
        except (TimeoutError, MessageError, asyncio.IncompleteReadError) as exc:
            log.info("autonat: dropping request from %s: %s", peer.short(), exc or "timeout")
            await stream.reset()
            return
        source = stream.remote_addr
        candidates = _candidates(request, source)
        if not candidates:
            await write_message(
                stream,
                {
                    "v": VERSION,
                    "status": "refused",
                    "reason": "no candidate on the IP your request came from",
                },
            )
            await stream.close()
            return
        async with self._slots:  # all candidates at once: a filtering NAT costs one timeout, not several
            outcomes = await asyncio.gather(*(self._dial_back(addr, peer) for addr in candidates))
        for addr, error in zip(candidates, outcomes, strict=True):
            if error is None:
                await write_message(stream, {"v": VERSION, "status": "ok", "addr": addr.to_bytes()})
                await stream.close()
                return
        reason = "; ".join(f"{addr}: {error}" for addr, error in zip(candidates, outcomes, strict=True))
        await write_message(stream, {"v": VERSION, "status": "failed", "reason": reason[:1000]})
        await stream.close()

    async def _dial_back(self, addr: Multiaddr, peer: PeerID) -> str | None:
        """None when `addr` reached `peer`, else why not."""
        try:
            async with asyncio.timeout(DIAL_BACK_TIMEOUT_S):
                # A new connection whatever is open, without the Host's per-peer dial sharing (which would
                # fold the candidates into one dial).
                conn = await self.host.dial_new(addr, peer)
        except (TimeoutError, TransportError, OSError) as exc:
            return str(exc) or "timed out"
        await conn.close()
        return None


def _candidates(request: dict[str, object], source: Multiaddr | None) -> list[Multiaddr]:
    if request.get("v") != VERSION or source is None or not isinstance(request.get("addrs"), list):
        return []
    source_ip = source.parts[0][1]
    out = []
    for raw in request["addrs"][:MAX_CANDIDATES]:  # type: ignore[index]
        try:
            addr = Multiaddr.from_bytes(raw).without_peer_id()
            addr.tcp_endpoint()
        except (TransportError, TypeError, ValueError):
            continue
        if addr.parts[0][1] == source_ip:
            out.append(addr)
    return out


def candidate_addrs(observed: Multiaddr, listen: list[Multiaddr]) -> list[Multiaddr]:
    """Our listen ports on the observed IP, then the observed address itself (a port-preserving NAT)."""
    kind, ip = observed.parts[0]
    out = [Multiaddr(((kind, ip), ("tcp", str(a.tcp_endpoint()[1])))) for a in listen]
    if observed.without_peer_id() not in out:
        out.append(observed.without_peer_id())
    return out[:MAX_CANDIDATES]


def _local_ips(host: Host, servers: list[PeerID]) -> set[str]:
    """The source IPs our connections to `servers` left from: no NAT when the server saw one of them."""
    ips = set()
    for server in servers:
        conn = host.connection(server)
        local = conn.local_addr if conn is not None else None
        if local is not None:
            ips.add(local.parts[0][1])
    return ips


async def check(host: Host, servers: list[PeerID], own_ips: set[str] | None = None) -> Reachability:
    """Ask each connected peer in `servers` to dial us back; the verdict over all their answers."""
    result = Reachability()
    for server in servers:
        try:
            info = await host.identify(server)
            if info.observed_addr is None:
                continue
            result.observed = info.observed_addr
            addrs = candidate_addrs(info.observed_addr, host.listen_addrs)
            stream = await host.new_stream(server, PROTOCOL)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await write_message(stream, {"v": VERSION, "addrs": [a.to_bytes() for a in addrs]})
                reply = await read_message(stream, MAX_MESSAGE)
            await stream.close()
        except (TimeoutError, TransportError, MessageError, asyncio.IncompleteReadError) as exc:
            log.info("autonat: %s gave no verdict: %s", server.short(), exc or "timeout")
            continue
        if reply.get("status") == "ok":
            result.confirmations += 1
            try:
                addr = Multiaddr.from_bytes(reply["addr"])
            except (KeyError, TypeError, TransportError):
                continue
            if addr not in result.public_addrs:
                result.public_addrs.append(addr)
        else:
            result.failures += 1
            log.info("autonat: %s could not dial us back: %s", server.short(), reply.get("reason"))
    if result.confirmations:
        result.status = PUBLIC
    elif result.failures and result.observed is not None:
        own = set(own_ips or ()) | _local_ips(host, servers)
        result.status = FIREWALLED if result.observed.parts[0][1] in own else PRIVATE
    log.info(
        "reachability of %s: %s (observed %s, %d confirmations, %d failures)",
        host.peer_id.short(),
        result.status,
        result.observed,
        result.confirmations,
        result.failures,
    )
    return result
