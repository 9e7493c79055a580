"""TCP hole punching coordinated over a relayed connection, in the manner of libp2p DCUtR.

Two peers joined by a relay each bind a TCP socket to a fresh local port (SO_REUSEPORT), learn what
their NAT maps that port to from a STUN responder over TCP, swap those addresses over the relayed
connection, and connect to each other at the same moment. Each SYN opens its own NAT for the other's;
whichever arrives second finds the mapping open, and the kernels complete a simultaneous open. The
Host's secure upgrade then runs on the punched socket, with the side that started the punch as the
Noise initiator.

Timing follows DCUtR: the initiator measures the relayed round trip, sends SYNC, and starts connecting
half a round trip later, when SYNC reaches the responder and it starts too. Every attempt has its own
deadline, and the whole punch has one; a NAT that maps each destination to a new port (symmetric)
makes the punch fail fast, and the relayed connection stays.

Wire: length-prefixed msgpack on `/shoal/holepunch/1.0.0`:
    initiator -> {v, type: "connect", addrs: [mapped ip4/tcp multiaddr bytes]}
    responder -> {v, type: "connect", addrs: [...]}
    initiator -> {v, type: "sync"}

Connection reversal, for an initiator that is itself publicly reachable (DCUtR's "unilateral upgrade"):
    initiator -> {v, type: "reverse", addrs: [its public addresses]}
    responder dials one of them directly -> {v, type: "reversed", ok: bool}
This turns every pair with one endpoint-independent-filtering NAT into a direct connection, whatever
the other NAT does, where a simultaneous open against a symmetric NAT would fail.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import resource
import socket
import time
from typing import Any

from ..errors import TransportError
from ..host import Host, Stream
from ..identity import PeerID
from ..messages import MessageError, read_message, write_message
from ..multiaddr import Multiaddr
from . import ice, stun
from .conduit import Holding, attach

log = logging.getLogger(__name__)

PROTOCOL = "/shoal/holepunch/1.0.0"
VERSION = 1
# Addresses fit in a few hundred bytes; an ICE offer or answer (SDP with candidates) in a few KiB.
MAX_MESSAGE = 16 * 1024
MAX_SDP_CHARS = 12 * 1024
MAX_ADDRS = 4
# The whole punch, from the first message to a secure connection: after this the relay stays in use.
# Across the internet a punch needs a few RTTs (each at most ~300 ms) plus one SYN retransmit (1 s).
PUNCH_DEADLINE_S = 5.0
# One connect() attempt; a SYN that found the peer's NAT still closed is resent on a new attempt.
ATTEMPT_TIMEOUT_S = 1.0
# Pause after an attempt was refused (an RST), so the peer's socket gets time to exist.
RETRY_PAUSE_S = 0.05
# Pending connections on the responder's punch port: one peer, plus strays that are closed at once.
PUNCH_BACKLOG = 4
# Port prediction for one symmetric NAT (the birthday paradox, as Tailscale does it for UDP): the easy
# side sends SYNs from its one mapped port to EASY_PROBES random ports of the hard side's address, the
# hard side sends HARD_PROBES SYNs from fresh ports (so fresh random mappings) to the easy side's
# mapping. Some pair meets with probability 1 - exp(-EASY * HARD / ports): 98 % for 1024 x 256 over
# the 64512 ports a random NAT picks from. Beyond that the cost (SYNs, sockets) buys little.
EASY_PROBES = 1024
HARD_PROBES = 256
PROBE_PORT_RANGE = (1024, 65536)
# The hard side starts this much later, so most of the easy side's SYNs have opened its NAT already.
HARD_SIDE_DELAY_S = 0.1
# File descriptors left for everything else while probes are open.
FD_RESERVE = 256
BOTH_SYMMETRIC = "both NATs symmetric"


class PunchError(TransportError):
    """A hole punch failed; the relayed connection is still there. `symmetric` says a NAT on the way maps
    each destination to a new port, which no punch without port prediction gets through."""

    def __init__(self, message: str, *, symmetric: bool = False) -> None:
        super().__init__(message)
        self.symmetric = symmetric


async def _mapping(stun_servers: list[tuple[str, int]]) -> tuple[Multiaddr, int, bool]:
    """A fresh local port, the public address our NAT maps it to, and whether that mapping depends on
    the destination (a symmetric NAT: two STUN servers at different addresses see different ports)."""
    errors = []
    seen: list[tuple[str, int]] = []
    local_port = 0
    distinct: list[tuple[str, int]] = []
    for server in stun_servers:
        if server[0] not in {other[0] for other in distinct}:
            distinct.append(server)
    for server in distinct:
        if len(seen) == 2:
            break
        try:
            mapped, local_port = await stun.query_tcp(server, local_port)
        except stun.StunError as exc:
            errors.append(str(exc))
            continue
        seen.append(mapped)
    if not seen:
        raise PunchError(f"no STUN server told us our TCP mapping: {'; '.join(errors) or 'none configured'}")
    ip, port = seen[0]
    return Multiaddr.from_tcp(ip, port), local_port, len(set(seen)) > 1


async def _connect_from(local_port: int, targets: list[Multiaddr], deadline: float) -> socket.socket:
    """Connect from `local_port` to one of `targets`, retrying until `deadline`; the connected socket."""
    loop = asyncio.get_running_loop()
    last: Exception | None = None
    while time.monotonic() < deadline:
        for target in targets:
            sock = stun.reusable_tcp_socket(local_port)
            try:
                budget = min(ATTEMPT_TIMEOUT_S, deadline - time.monotonic())
                async with asyncio.timeout(max(budget, 0.01)):
                    await loop.sock_connect(sock, target.tcp_endpoint())
            except (TimeoutError, OSError) as exc:
                sock.close()
                last = exc
                if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                    raise PunchError(f"local port {local_port} is taken: {exc}") from exc
                if not isinstance(exc, TimeoutError):
                    await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except BaseException:
                sock.close()
                raise
            return sock
    raise PunchError(f"no TCP simultaneous open with {', '.join(map(str, targets))}: {last or 'deadline'}")


async def _accept_on(local_port: int, targets: list[Multiaddr]) -> socket.socket:
    """Accept on `local_port` a connection from one of `targets` (anyone else is closed at once)."""
    loop = asyncio.get_running_loop()
    wanted = {target.tcp_endpoint() for target in targets}
    listener = stun.reusable_tcp_socket(local_port)
    try:
        listener.listen(PUNCH_BACKLOG)
        while True:
            sock, source = await loop.sock_accept(listener)
            if tuple(source[:2]) in wanted:
                sock.setblocking(False)
                return sock
            log.info("hole punch: closing a stray connection from %s:%d", source[0], source[1])
            sock.close()
    finally:
        listener.close()


async def _open(local_port: int, targets: list[Multiaddr], deadline: float, *, listen: bool) -> Any:
    """A TCP connection between our `local_port` and the peer's mapped address, as a transport.

    Both sides connect (a simultaneous open through the NATs). The responder also listens on its port:
    where no NAT filters (loopback, a full cone) the peer's SYN can reach it before its own connect()
    started and would otherwise be answered with an RST. Either way there is one 4-tuple, so at most
    one of the two ways yields a socket.
    """
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_connect_from(local_port, targets, deadline))]
    if listen:
        tasks.append(loop.create_task(_accept_on(local_port, targets)))
    sock: socket.socket | None = None
    error: BaseException | None = None
    try:
        pending = set(tasks)
        while pending and sock is None:
            done, pending = await asyncio.wait(
                pending, timeout=max(deadline - time.monotonic(), 0.01), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                if task.exception() is None:
                    sock = task.result()
                    break
                error = task.exception()
    finally:
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, socket.socket) and outcome is not sock:
                outcome.close()
    if sock is None:
        if isinstance(error, PunchError):
            raise error
        raise PunchError(f"no TCP connection with {', '.join(map(str, targets))}: {error or 'deadline'}")
    transport, _ = await loop.create_connection(Holding, sock=sock)
    return transport


def _addrs(message: dict[str, Any]) -> list[Multiaddr]:
    out = []
    raw = message.get("addrs")
    for item in raw[:MAX_ADDRS] if isinstance(raw, list) else []:
        try:
            addr = Multiaddr.from_bytes(item)
            addr.tcp_endpoint()
        except (TransportError, TypeError, ValueError):
            continue
        out.append(addr)
    return out


async def punch(host: Host, peer: PeerID, stun_servers: list[tuple[str, int]]) -> Any:
    """Punch a direct TCP connection to `peer`, coordinated over the (relayed) connection we have to it.

    Returns the new secure connection (path "tcp-punch"); PunchError when it fails within
    PUNCH_DEADLINE_S. The caller decides which connection new streams use.
    """
    deadline = time.monotonic() + PUNCH_DEADLINE_S
    symmetric = False
    try:
        async with asyncio.timeout(PUNCH_DEADLINE_S):
            mapped, local_port, symmetric = await _mapping(stun_servers)
            stream = await host.new_stream(peer, PROTOCOL)
            try:
                sent = time.monotonic()
                await write_message(
                    stream,
                    {"v": VERSION, "type": "connect", "addrs": [mapped.to_bytes()], "symmetric": symmetric},
                )
                reply = await read_message(stream, MAX_MESSAGE)
                rtt = time.monotonic() - sent
                targets = _addrs(reply)
                if reply.get("type") != "connect" or not targets:
                    reason = reply.get("reason")
                    raise PunchError(
                        f"{peer.short()} sent no address to punch to ({reason})",
                        symmetric=reason == BOTH_SYMMETRIC,
                    )
                await write_message(stream, {"v": VERSION, "type": "sync"})
                # The responder's STUN queries sat inside `rtt`; half of the rest is our head start.
                await asyncio.sleep(min(rtt / 2, ATTEMPT_TIMEOUT_S))
                peer_symmetric = reply.get("symmetric") is True
                transport = await _establish(
                    local_port, symmetric, peer_symmetric, targets, deadline, listen=False
                )
            finally:
                await stream.close()
            conn = await attach(host, transport, initiator=True, expected=peer, path="tcp-punch")
            conn.punch_mode = _mode(symmetric, peer_symmetric)
            return conn
    except TimeoutError as exc:
        raise PunchError(
            f"hole punch to {peer.short()} passed its {PUNCH_DEADLINE_S} s deadline", symmetric=symmetric
        ) from exc
    except (MessageError, asyncio.IncompleteReadError) as exc:
        raise PunchError(f"hole punch to {peer.short()} broke off: {exc}") from exc


async def _establish(
    local_port: int,
    symmetric: bool,
    peer_symmetric: bool,
    targets: list[Multiaddr],
    deadline: float,
    *,
    listen: bool,
) -> Any:
    """The TCP connection of a punch: a simultaneous open when neither NAT is symmetric, else port
    prediction with the symmetric side as the hard one."""
    if not symmetric and not peer_symmetric:
        return await _open(local_port, targets, deadline, listen=listen)
    if symmetric:
        await asyncio.sleep(HARD_SIDE_DELAY_S)  # let the easy side's probes open its NAT first
        target = targets[0].tcp_endpoint()
        pairs = [(stun.reusable_tcp_socket(0), target) for _ in range(_budget(HARD_PROBES))]
    else:
        ip = targets[0].tcp_endpoint()[0]
        ports = random.sample(range(*PROBE_PORT_RANGE), _budget(EASY_PROBES))
        pairs = [(stun.reusable_tcp_socket(local_port), (ip, port)) for port in ports]
    sock = await _first_connected(pairs, deadline, wait_for_data=listen)
    transport, _ = await asyncio.get_running_loop().create_connection(Holding, sock=sock)
    return transport


def _mode(symmetric: bool, peer_symmetric: bool) -> str:
    return "port prediction" if symmetric or peer_symmetric else "simultaneous open"


def _budget(wanted: int) -> int:
    """Probe sockets we may open: `wanted`, or fewer when the file-descriptor limit is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + FD_RESERVE and soft < hard:
        soft = min(hard, wanted + FD_RESERVE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(1, min(wanted, soft - FD_RESERVE))


async def _first_connected(
    pairs: list[tuple[socket.socket, tuple[str, int]]], deadline: float, *, wait_for_data: bool
) -> socket.socket:
    """Connect every socket to its destination at once and pick one connection; the rest close.

    Several probe pairs may meet (about four with the default counts), and the two sides must pick the
    same one: the Noise initiator takes the first that connects and speaks first on it, and the
    responder (`wait_for_data`) takes the first connection on which data arrives, skipping those the
    initiator closed.
    """
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(loop.sock_connect(sock, dest)): sock for sock, dest in pairs}
    spoken: asyncio.Future[socket.socket] = loop.create_future()
    watched: list[socket.socket] = []
    winner: socket.socket | None = None

    def on_readable(sock: socket.socket) -> None:
        loop.remove_reader(sock.fileno())
        try:
            has_data = bool(sock.recv(1, socket.MSG_PEEK))
        except OSError:
            has_data = False
        if has_data and not spoken.done():
            spoken.set_result(sock)

    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        if wait_for_data:
            pending.add(spoken)
        while pending and winner is None:
            done, pending = await asyncio.wait(
                pending, timeout=max(deadline - time.monotonic(), 0.01), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                if task is spoken:
                    winner = spoken.result()
                elif not task.cancelled() and task.exception() is None:
                    if not wait_for_data:
                        winner = tasks[task]  # type: ignore[index]
                        break
                    sock = tasks[task]  # type: ignore[index]
                    watched.append(sock)
                    loop.add_reader(sock.fileno(), on_readable, sock)
    finally:
        for sock in watched:
            loop.remove_reader(sock.fileno())
        spoken.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in tasks.values():
            if sock is not winner:
                sock.close()
    if winner is None:
        raise PunchError(f"port prediction found no open pair among {len(pairs)} probes", symmetric=True)
    log.info("port prediction: connected %s -> %s", winner.getsockname(), winner.getpeername())
    return winner


async def reverse(host: Host, peer: PeerID, my_addrs: list[Multiaddr]) -> Any:
    """Ask `peer` (reached through a relay) to dial us at `my_addrs`; returns that direct connection."""
    try:
        async with asyncio.timeout(PUNCH_DEADLINE_S):
            stream = await host.new_stream(peer, PROTOCOL)
            try:
                addrs = [a.without_peer_id().to_bytes() for a in my_addrs][:MAX_ADDRS]
                await write_message(stream, {"v": VERSION, "type": "reverse", "addrs": addrs})
                reply = await read_message(stream, MAX_MESSAGE)
            finally:
                await stream.close()
    except TimeoutError as exc:
        raise PunchError(f"{peer.short()} did not dial us back within {PUNCH_DEADLINE_S} s") from exc
    except (MessageError, asyncio.IncompleteReadError) as exc:
        raise PunchError(f"connection reversal with {peer.short()} broke off: {exc}") from exc
    if reply.get("type") != "reversed" or reply.get("ok") is not True:
        raise PunchError(f"{peer.short()} could not dial us directly: {reply.get('reason')!r}")
    # Its "reversed" came over the relay and may overtake the last handshake message on the direct path.
    end = time.monotonic() + ATTEMPT_TIMEOUT_S
    while time.monotonic() < end:
        for conn in host.connections(peer):
            if conn.inbound and getattr(conn, "path", "direct") == "direct":
                return conn
        await asyncio.sleep(0.01)
    raise PunchError(f"{peer.short()} says it dialed us, but no direct connection from it is open")


async def ice_punch(host: Host, peer: PeerID, servers: ice.IceServers) -> Any:
    """An ICE (UDP) connection to `peer`, signalled over the (relayed) connection we have to it, with the
    secure channel on top; PunchError within ICE_DEADLINE_S when no candidate pair works."""
    pc = None
    try:
        async with asyncio.timeout(ice.ICE_DEADLINE_S):
            pc, channel, offer_sdp = await ice.offer(servers)
            stream = await host.new_stream(peer, PROTOCOL)
            try:
                await write_message(stream, {"v": VERSION, "type": "ice-offer", "sdp": offer_sdp})
                reply = await read_message(stream, MAX_MESSAGE)
            finally:
                await stream.close()
            sdp = reply.get("sdp")
            if reply.get("type") != "ice-answer" or not isinstance(sdp, str) or len(sdp) > MAX_SDP_CHARS:
                raise PunchError(f"{peer.short()} gave no ICE answer: {reply.get('reason')!r}")
            transport = await ice.finish_offer(pc, channel, sdp)
            return await attach(host, transport, initiator=True, expected=peer, path="ice")
    except TimeoutError as exc:
        if pc is not None:
            await pc.close()
        raise PunchError(f"ICE with {peer.short()} found no working pair in {ice.ICE_DEADLINE_S} s") from exc
    except BaseException:
        if pc is not None:
            await pc.close()
        raise


class PunchResponder:
    """Answers punches started by peers; `on_connection(conn)` gets each punched connection."""

    def __init__(
        self,
        host: Host,
        stun_servers: list[tuple[str, int]],
        on_connection: Any = None,
        ice_servers: ice.IceServers | None = None,
    ) -> None:
        self.host = host
        self.stun_servers = stun_servers
        self.ice_servers = ice_servers
        self.on_connection = on_connection
        host.set_stream_handler(PROTOCOL, self._serve)

    async def _serve(self, stream: Stream) -> None:
        peer = stream.remote_peer_id
        try:
            try:
                async with asyncio.timeout(PUNCH_DEADLINE_S):
                    request = await read_message(stream, MAX_MESSAGE)
                kind = request.get("type") if request.get("v") == VERSION else None
                if kind == "ice-offer":
                    conn = await self._ice_answer(stream, peer, request)
                elif kind == "reverse":
                    conn = await self._dial_back(stream, peer, _addrs(request))
                elif kind == "connect":
                    hard = request.get("symmetric") is True
                    conn = await self._punch_back(stream, peer, _addrs(request), hard)
                else:
                    raise PunchError(f"{peer.short()} sent an unknown punch request {kind!r}")
            except (TimeoutError, TransportError, MessageError, asyncio.IncompleteReadError) as exc:
                log.info("hole punch from %s failed: %s", peer.short(), exc or "deadline")
                await stream.reset()
                return
            await stream.close()
        except TransportError:
            return  # the relayed connection went away meanwhile: nothing left to tell the peer
        if conn is not None and self.on_connection is not None:
            self.on_connection(conn)

    async def _punch_back(
        self, stream: Stream, peer: PeerID, targets: list[Multiaddr], peer_symmetric: bool
    ) -> Any:
        deadline = time.monotonic() + PUNCH_DEADLINE_S
        if not targets:
            raise PunchError(f"{peer.short()} sent no address to punch to")
        async with asyncio.timeout(PUNCH_DEADLINE_S):
            mapped, local_port, symmetric = await _mapping(self.stun_servers)
            if symmetric and peer_symmetric:
                await write_message(
                    stream, {"v": VERSION, "type": "connect", "addrs": [], "reason": BOTH_SYMMETRIC}
                )
                raise PunchError("both NATs map every destination to a new port: no punch", symmetric=True)
            await write_message(
                stream,
                {"v": VERSION, "type": "connect", "addrs": [mapped.to_bytes()], "symmetric": symmetric},
            )
            sync = await read_message(stream, MAX_MESSAGE)
            if sync.get("type") != "sync":
                raise PunchError(f"{peer.short()} sent {sync.get('type')!r} where SYNC belongs")
            transport = await _establish(
                local_port, symmetric, peer_symmetric, targets, deadline, listen=True
            )
            conn = await attach(self.host, transport, initiator=False, expected=peer, path="tcp-punch")
        conn.punch_mode = _mode(symmetric, peer_symmetric)
        log.info("hole punched to %s (%s): %s", peer.short(), conn.punch_mode, conn.remote_addr)
        return conn

    async def _ice_answer(self, stream: Stream, peer: PeerID, request: dict[str, Any]) -> Any:
        sdp = request.get("sdp")
        if self.ice_servers is None or not isinstance(sdp, str) or len(sdp) > MAX_SDP_CHARS:
            reason = "ICE is not configured here" if self.ice_servers is None else "malformed offer"
            await write_message(stream, {"v": VERSION, "type": "ice-answer", "sdp": None, "reason": reason})
            return None
        pc = None
        try:
            async with asyncio.timeout(ice.ICE_DEADLINE_S):
                pc, answer_sdp, arrived = await ice.answer(self.ice_servers, sdp)
                await write_message(stream, {"v": VERSION, "type": "ice-answer", "sdp": answer_sdp})
                transport = await arrived
                conn = await attach(self.host, transport, initiator=False, expected=peer, path="ice")
        except BaseException:
            if pc is not None:
                await pc.close()
            raise
        log.info("ICE connection from %s", peer.short())
        return conn

    async def _dial_back(self, stream: Stream, peer: PeerID, targets: list[Multiaddr]) -> Any:
        """Dial the peer at the addresses it gave (at most MAX_ADDRS, as DCUtR does); the handshake must
        prove the requester's own identity, so these dials cannot open sessions with anyone else."""
        errors = []
        for target in targets:
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S * 2):
                    conn = await self.host.dial_new(target, peer)  # beside the relayed connection
            except (TimeoutError, TransportError) as exc:
                errors.append(f"{target}: {exc or 'timed out'}")
                continue
            conn.path = "direct"
            await write_message(stream, {"v": VERSION, "type": "reversed", "ok": True})
            log.info("dialed %s directly at its request: %s", peer.short(), target)
            return conn
        reason = "; ".join(errors)[:1000] or "no address given"
        await write_message(stream, {"v": VERSION, "type": "reversed", "ok": False, "reason": reason})
        return None
