"""The asyncio host: listen, dial, upgrade connections, open and accept streams.

Each TCP connection is upgraded exactly as libp2p specifies: multistream-select picks `/noise`, the
Noise XX handshake proves both identities, yamux is agreed inside Noise (or by multistream-select with
peers that do not offer it), and every yamux stream negotiates its own protocol with multistream-select
again. The protocol logic lives in the sans-I/O cores (`multistream`, `noise`, `yamux`); the bytes move
in `connection.py`; this module holds the peer-level logic: one connection per peer, limits, timeouts,
identify and ping.

Tasks (handshakes, stream handlers) are tracked by the host and cancelled and awaited by `close()`: the
host's lifetime is not one lexical block, so a TaskGroup cannot hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from . import identify as identify_proto
from . import multistream, noise
from .admission import PendingHandshakes, extra_connection, table_victim
from .allocator import TRIM_INTERVAL_S, give_back_freed_memory, keep_freed_memory
from .connection import MUXERS, Connection, Stream
from .errors import (
    ConnectionClosedError,
    DuplicateIdentityError,
    LimitError,
    NegotiationError,
    PeerIDMismatchError,
    ProtocolError,
    TransportError,
)
from .identity import PeerID, PublicKey, encode_public_key, peer_id_from_key
from .limits import HostLimits
from .lograte import LogThrottle
from .multiaddr import Multiaddr

log = logging.getLogger(__name__)

PING_PROTOCOL_ID = "/ipfs/ping/1.0.0"
PING_SIZE = 32


# A stream read this recently is being served: the memory budget resets parked streams first.
READING_S = 1.0


class Host:
    """A Shoal peer's network endpoint: one identity, listeners, and at most one live connection per peer."""

    def __init__(self, key: ed25519.Ed25519PrivateKey, limits: HostLimits) -> None:
        self.identity_key = key
        self.peer_id = peer_id_from_key(key)
        self.noise_static = noise.NoiseStatic(key, MUXERS)
        self.limits = limits
        self.listen_addrs: list[Multiaddr] = []
        self._servers: list[asyncio.Server] = []
        self._handlers: dict[str, Callable[[Stream], Awaitable[None]]] = {}
        self._conns: dict[PeerID, Connection] = {}
        self._all_conns: set[Connection] = set()
        self._dials: dict[PeerID, asyncio.Future[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handshakes: PendingHandshakes[Connection] = PendingHandshakes(limits)
        self._strangers = LogThrottle(log)  # refusals and evictions: rate-limited, summed up per minute
        # Unread bytes in all streams, kept incrementally; recounted exactly whenever it passes the budget.
        self.buffered = 0
        # Above the budget with only streams being read, recount only once this much more has arrived: the
        # recount walks every stream, and would otherwise run on every frame until they are read.
        self._recount_at = 0
        self._closing = False
        # What peers told us through identify, and the addresses we know them by.
        self.peer_addrs: dict[PeerID, list[Multiaddr]] = {}
        self.observed_addrs: dict[PeerID, Multiaddr] = {}
        self.set_stream_handler(PING_PROTOCOL_ID, self._serve_ping)
        self.set_stream_handler(identify_proto.PROTOCOL_ID, self._serve_identify)

    @classmethod
    async def create(
        cls,
        key: ed25519.Ed25519PrivateKey,
        listen: Sequence[str | Multiaddr] = (),
        *,
        limits: HostLimits | None = None,
    ) -> Host:
        keep_freed_memory()  # see allocator.py: a third of the CPU per byte otherwise goes to page faults
        host = cls(key, limits or HostLimits())
        try:
            for addr in listen:
                await host.listen(addr)
            host._spawn(host._reap_idle(), "idle reaper")
            host._spawn(host._give_back_memory(), "memory trimmer")
        except BaseException:
            await host.close()
            raise
        return host

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def listen(self, addr: str | Multiaddr) -> Multiaddr:
        maddr = Multiaddr.parse(addr)
        host, port = maddr.tcp_endpoint()
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: Connection(self, inbound=True), host, port)
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {maddr}: {exc.strerror or exc}; is the port taken by another daemon?"
            ) from exc
        self._servers.append(server)
        bound: Multiaddr | None = None
        for sock in server.sockets:
            sock_host, sock_port = sock.getsockname()[:2]
            if maddr.parts[0][0] in ("ip4", "ip6"):
                bound = Multiaddr.from_tcp(sock_host, sock_port)
            else:  # a DNS name: keep it, with the port the kernel chose
                bound = Multiaddr((maddr.parts[0], ("tcp", str(sock_port))))
            self.listen_addrs.append(bound)
        assert bound is not None
        log.info("peer %s listening on %s", self.peer_id.short(), bound)
        return bound

    def set_stream_handler(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]) -> None:
        """Serve `protocol` with `handler`; when the handler returns, the host closes our side of the
        stream (a handler that fails gets it reset)."""
        self._handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def is_connected(self, peer_id: PeerID) -> bool:
        return peer_id in self._conns

    @property
    def connected_peers(self) -> list[PeerID]:
        return list(self._conns)

    # ------------------------------------------------------------------ dialing

    async def connect(self, addr: Multiaddr | str) -> PeerID:
        """Dial `addr` (reusing a live connection to its /p2p/ peer if any); returns the proven peer id."""
        maddr = Multiaddr.parse(addr)
        expected = maddr.peer_id
        if expected is not None and expected in self._conns:
            return expected
        conn = await self._dial(maddr, expected)
        assert conn.remote_peer_id is not None
        return conn.remote_peer_id

    async def _dial(self, maddr: Multiaddr, expected: PeerID | None) -> Connection:
        if self._closing:
            raise ConnectionClosedError("the host is closed")
        if expected is not None:
            if expected == self.peer_id:
                raise DuplicateIdentityError(
                    f"{maddr} names our own peer id {expected}; refusing to dial ourselves"
                )
            inflight = self._dials.get(expected)
            if inflight is not None:
                return await asyncio.shield(inflight)
        self._make_room(f"cannot dial {maddr}")
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        if expected is not None:
            self._dials[expected] = future
        try:
            conn = await self._dial_once(maddr, expected)
            future.set_result(conn)
            return conn
        except asyncio.CancelledError:
            # Our caller was cancelled; callers sharing this dial were not, so they get an error.
            future.set_exception(ConnectionClosedError(f"the dial to {maddr} was cancelled"))
            future.exception()  # mark retrieved: other waiters may not exist
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            if expected is not None and self._dials.get(expected) is future:
                del self._dials[expected]

    async def _dial_once(self, maddr: Multiaddr, expected: PeerID | None) -> Connection:
        host, port = maddr.tcp_endpoint()
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                _, proto = await loop.create_connection(lambda: Connection(self, inbound=False), host, port)
                conn = proto
                await conn.upgrade(expected)
        except TimeoutError as exc:
            if conn is not None:
                conn.abort("handshake timed out")
            raise TransportError(
                f"dialing {maddr} timed out after {self.limits.handshake_timeout_s} s; is the peer up?"
            ) from exc
        except OSError as exc:
            raise TransportError(f"cannot reach {maddr}: {exc.strerror or exc}") from exc
        except (ProtocolError, ConnectionClosedError) as exc:
            if conn is not None:
                conn.abort(str(exc))
            if isinstance(exc, PeerIDMismatchError):
                raise
            raise TransportError(f"upgrading the connection to {maddr} failed: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.abort("dial cancelled")
            raise
        assert conn.remote_peer_id is not None
        if conn.remote_peer_id == self.peer_id:
            conn.abort("the remote uses our own key")
            ours = ", ".join(map(str, self.listen_addrs)) or "no listen address"
            raise DuplicateIdentityError(
                f"another live daemon at {maddr} uses our key {self.peer_id} (we listen on {ours}); "
                "stop one of them or give it its own key with `peer keygen`"
            )
        self._register(conn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected to %s", conn.who())
        return conn

    # ------------------------------------------------------------------ hooks for the NAT layer

    def connection(self, peer_id: PeerID) -> Connection | None:
        """The live connection new streams to `peer_id` use, or None."""
        conn = self._conns.get(peer_id)
        return None if conn is None or conn.closed.done() else conn

    def connections(self, peer_id: PeerID) -> list[Connection]:
        """Every secured, live connection to `peer_id`: a relayed and a punched one may overlap."""
        return [
            c
            for c in self._all_conns
            if c.remote_peer_id == peer_id and c.session is not None and not c.closed.done()
        ]

    def prefer(self, conn: Connection) -> None:
        """Make `conn` the connection new streams to its peer use (a punched path replacing a relay)."""
        assert conn.remote_peer_id is not None
        self._conns[conn.remote_peer_id] = conn

    async def dial_new(self, addr: Multiaddr | str, peer_id: PeerID | None) -> Connection:
        """A fresh connection to `addr`, beside any open one and not shared with other dials to the same
        peer: a dial-back per candidate address, a direct path beside a relayed one."""
        if self._closing:
            raise ConnectionClosedError("the host is closed")
        self._make_room(f"cannot dial {addr}")
        return await self._dial_once(Multiaddr.parse(addr), peer_id)

    def new_connection(self, *, inbound: bool) -> Connection:
        """A connection for a byte pipe of the caller's (a relayed stream, a punched socket). The caller
        gives it a transport, runs `upgrade()`, then `adopt()`s it, or `discard()`s it on failure; the
        host's `close()` tears it down either way."""
        conn = Connection(self, inbound=inbound)
        self._all_conns.add(conn)
        return conn

    def adopt(self, conn: Connection) -> None:
        """Registers an upgraded `new_connection()` as a connection to its (proven) peer."""
        self._register(conn)

    def discard(self, conn: Connection) -> None:
        """Forgets a `new_connection()` whose upgrade failed."""
        self._all_conns.discard(conn)

    async def ensure_unique_identity(self, addrs: Sequence[Multiaddr | str]) -> None:
        """Refuse to run beside another live daemon with our key.

        `addrs` are addresses the run knows for our own peer id (from the DHT or a peer list). Each is
        dialed; one that completes a handshake as our peer id raises DuplicateIdentityError naming both
        addresses. Dead addresses, and addresses now held by other peers, are fine.
        """
        for addr in addrs:
            maddr = Multiaddr.parse(addr).without_peer_id()
            if maddr in self.listen_addrs:
                continue
            try:
                await self._dial(maddr, None)
            except DuplicateIdentityError:
                raise
            except TransportError as exc:
                log.debug("identity check: %s is not us (%s)", maddr, exc)

    async def new_stream(
        self, peer_id: PeerID, protocol: str, addrs: Sequence[Multiaddr | str] = (), lazy: bool = False
    ) -> Stream:
        """Open a stream to `peer_id` speaking `protocol`, dialing one of `addrs` if not yet connected.

        `lazy`: for a peer known to speak `protocol`: returns once the proposal is written, without waiting
        a round trip for the answer, which the stream's first read checks (NegotiationError there)."""
        conn = self._conns.get(peer_id)
        if conn is None or conn.closed.done() or (conn.session and conn.session.go_away_received):
            conn = await self._connect_any(peer_id, addrs)
        stream = conn.open_stream()
        if lazy:
            dialer = multistream.MultistreamDialer([protocol])
            try:
                await stream.write(dialer.data_to_send())
            except BaseException:
                await stream.reset()
                raise
            stream.protocol = protocol
            stream.negotiate_on_first_read(dialer)
            return stream
        try:
            async with asyncio.timeout(self.limits.negotiate_timeout_s):
                ms = multistream.MultistreamDialer([protocol])
                if not await _negotiate(stream, ms):
                    raise NegotiationError(
                        f"{peer_id.short()} closed the stream while negotiating {protocol}"
                    )
        except TimeoutError as exc:
            await stream.reset()
            raise TransportError(f"{peer_id.short()} did not agree on {protocol} in time") from exc
        except NegotiationError as exc:
            await stream.reset()
            raise NegotiationError(f"peer {peer_id.short()} does not speak {protocol}: {exc}") from exc
        except BaseException:
            await stream.reset()
            raise
        stream.protocol = protocol
        stream.unread(ms.unused_data)
        return stream

    async def _connect_any(self, peer_id: PeerID, addrs: Sequence[Multiaddr | str]) -> Connection:
        candidates = [Multiaddr.parse(a) for a in addrs] or self.peer_addrs.get(peer_id, [])
        if not candidates:
            raise TransportError(f"no address known for peer {peer_id}; pass addrs or connect() first")
        errors: list[str] = []
        for addr in candidates:
            if addr.peer_id is not None and addr.peer_id != peer_id:
                continue
            try:
                return await self._dial(addr.without_peer_id(), peer_id)
            except PeerIDMismatchError:
                raise
            except TransportError as exc:
                errors.append(str(exc))
        raise TransportError(f"could not reach {peer_id} at any of its addresses: {'; '.join(errors)}")

    # ------------------------------------------------------------------ built-in protocols

    async def ping(self, peer_id: PeerID, addrs: Sequence[Multiaddr | str] = ()) -> float:
        """Round-trip time in seconds of one `/ipfs/ping/1.0.0` exchange."""
        stream = await self.new_stream(peer_id, PING_PROTOCOL_ID, addrs)
        try:
            payload = os.urandom(PING_SIZE)
            start = time.perf_counter()
            await stream.write(payload)
            echo = await stream.readexactly(PING_SIZE)
            rtt = time.perf_counter() - start
            if echo != payload:
                raise ProtocolError(f"ping reply from {peer_id.short()} does not match what we sent")
            return rtt
        finally:
            await stream.close()

    async def identify(
        self, peer_id: PeerID, addrs: Sequence[Multiaddr | str] = ()
    ) -> identify_proto.IdentifyInfo:
        """Ask `peer_id` who it is; remembers its listen addresses and what it saw our address as."""
        stream = await self.new_stream(peer_id, identify_proto.PROTOCOL_ID, addrs)
        data = bytearray()
        try:
            while chunk := await stream.read():
                data += chunk
                if len(data) > identify_proto.MAX_IDENTIFY_SIZE:
                    raise ProtocolError(f"identify reply from {peer_id.short()} exceeds the size limit")
        except BaseException:
            await stream.reset()
            raise
        await stream.close()
        info = identify_proto.unframe(bytes(data))
        info.check_sender(peer_id)
        if info.listen_addrs:
            self.peer_addrs[peer_id] = info.listen_addrs
        if info.observed_addr is not None:
            self.observed_addrs[peer_id] = info.observed_addr
        return info

    async def _serve_ping(self, stream: Stream) -> None:
        """Echo 32-byte pings until the peer closes its side (the spec allows many pings per stream), or
        until none comes for ping_idle_timeout_s: an idle ping stream holds a slot for nothing."""
        while True:
            try:
                async with asyncio.timeout(self.limits.ping_idle_timeout_s):
                    payload = await stream.readexactly(PING_SIZE)
            except (asyncio.IncompleteReadError, TimeoutError):
                break
            await stream.write(payload)
        await stream.close()

    async def _serve_identify(self, stream: Stream) -> None:
        info = identify_proto.IdentifyInfo(
            public_key=PublicKey.from_protobuf(encode_public_key(self.identity_key.public_key())),
            listen_addrs=list(self.listen_addrs),
            observed_addr=stream.remote_addr,
            protocols=self.protocols,
            protocol_version=identify_proto.PROTOCOL_VERSION,
            agent_version=identify_proto.AGENT_VERSION,
        )
        await stream.write(identify_proto.frame(info))
        await stream.close()

    # ------------------------------------------------------------------ inbound side

    # The ConnectionOwner side (transport/connection.py): what a connection tells its host.

    def on_connection_made(self, conn: Connection) -> None:
        self._all_conns.add(conn)
        if not conn.inbound:
            return
        if self._closing:
            conn.abort("host is closing")
            return
        if len(self._all_conns) > self.limits.max_connections:
            victim = table_victim(self._all_conns, {conn}, self.limits)
            if victim is None:
                why = f"{len(self._all_conns) - 1} connections open, none over its address's share"
                self._strangers.note(logging.WARNING, "refused a connection", _source(conn), why)
                conn.abort("connection limit")
                return
            self._evict(victim, "the connection table is full and its address holds the most")
        evicted, why = self._handshakes.admit(conn)
        if evicted is not None:
            self._strangers.note(logging.INFO, "evicted a pending handshake", _source(evicted), why)
            evicted.abort(f"evicted: {why}")
        self._spawn(self._accept(conn), f"handshake with {conn.remote_addr}")

    async def _accept(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                await conn.upgrade(None)
        except (TimeoutError, ProtocolError, ConnectionClosedError) as exc:
            self._strangers.note(logging.INFO, "failed handshake", _source(conn), str(exc) or "timed out")
            conn.abort(f"handshake failed: {exc}")
            return
        finally:
            self._handshakes.done(conn)
        if conn.remote_peer_id == self.peer_id:
            log.error(
                "another live daemon at %s uses our key %s; stop one of them (we listen on %s)",
                conn.remote_addr,
                self.peer_id,
                ", ".join(map(str, self.listen_addrs)),
            )
            conn.abort("duplicate identity")
            return
        with contextlib.suppress(ConnectionClosedError):  # the host closed meanwhile
            self._register(conn)

    def _register(self, conn: Connection) -> None:
        assert conn.remote_peer_id is not None
        if self._closing:  # a dial that finished while close() ran: leave nothing behind
            conn.abort("host is closing")
            raise ConnectionClosedError(f"the host closed while connecting to {conn.who()}")
        # Keep the first live connection to a peer; a second one (simultaneous dial) still serves its
        # own streams until it idles out.
        current = self._conns.get(conn.remote_peer_id)
        if current is None or current.closed.done():
            self._conns[conn.remote_peer_id] = conn
        # One identity holds at most max_connections_per_peer: a further one closes its least useful.
        mine = [c for c in self._all_conns if c.remote_peer_id == conn.remote_peer_id and not c.closed.done()]
        extra = extra_connection(mine, {conn, self._conns[conn.remote_peer_id]}, self.limits)
        if extra is not None:
            self._evict(extra, "over the per-identity cap on connections")
        if not conn.inbound and conn.remote_addr is not None:
            known = self.peer_addrs.setdefault(conn.remote_peer_id, [])
            if conn.remote_addr not in known:
                known.append(conn.remote_addr)

    def _forget(self, conn: Connection) -> None:
        if conn.remote_peer_id is not None and self._conns.get(conn.remote_peer_id) is conn:
            del self._conns[conn.remote_peer_id]

    def on_connection_lost(self, conn: Connection) -> None:
        self._all_conns.discard(conn)
        self._handshakes.done(conn)
        self._forget(conn)

    def _evict(self, conn: Connection, why: str) -> None:
        self._strangers.note(logging.INFO, "evicted a connection", _source(conn), why)
        self._forget(conn)
        self._all_conns.discard(conn)
        conn.abort(f"evicted: {why}")

    def _make_room(self, what: str) -> None:
        """Before a dial: a full table makes way as for an inbound newcomer, or the dial is refused."""
        if len(self._all_conns) < self.limits.max_connections:
            return
        victim = table_victim(self._all_conns, set(), self.limits)
        if victim is None:
            raise LimitError(f"already {self.limits.max_connections} connections open; {what}")
        self._evict(victim, "the connection table is full and its address holds the most")

    def on_stream_opened(self, stream: Stream) -> None:
        name = f"stream {stream.stream_id} from {stream.remote_peer_id.short()}"
        self._spawn(self._serve_stream(stream), name)

    def note_stranger(self, level: int, what: str, source: str, why: str) -> None:
        """A line about what a remote peer did, at a bounded rate (a flood becomes one summary a minute)."""
        self._strangers.note(level, what, source, why)

    def on_buffered(self, delta: int) -> None:
        self.buffered += delta
        if self.buffered > max(self.limits.max_buffered_bytes, self._recount_at):
            self._enforce_buffer_budget()
            self._recount_at = self.buffered + self.limits.max_buffered_bytes // 8
        elif self.buffered <= self.limits.max_buffered_bytes:
            self._recount_at = 0

    def _enforce_buffer_budget(self) -> None:
        """Resets streams, the one read least recently first, until a quarter of the budget is free; streams
        read in the last READING_S only when the host holds over twice its budget."""
        holding = [s for c in self._all_conns for s in c.streams.values() if s.buffered]
        self.buffered = sum(s.buffered for s in holding)  # exact again: the estimate may have drifted
        budget = self.limits.max_buffered_bytes
        if self.buffered <= budget:
            return
        now = time.monotonic()
        for stream in sorted(holding, key=lambda s: s.last_read):
            if self.buffered <= budget * 3 // 4:
                break
            held, idle = stream.buffered, now - stream.last_read
            read = f"last read {idle:.1f} s ago" if stream.last_read else "never read by its handler"
            if idle < READING_S and self.buffered <= 2 * budget:
                break  # the rest are being read (each bounded by its window): only a flood past twice goes
            stream.reset_now("was reset: the host holds too much unread data")
            self.note_stranger(
                logging.WARNING, "reset a stream over the memory budget", stream.remote_peer_id.short(),
                f"{held >> 10} KiB unread, {read}, all streams {self.buffered >> 20} MiB unread "
                f"(budget {budget >> 20} MiB)",
            )  # fmt: skip

    def on_going_away(self, conn: Connection) -> None:
        self._forget(conn)

    async def _serve_stream(self, stream: Stream) -> None:
        try:
            async with asyncio.timeout(self.limits.negotiate_timeout_s):
                ms = multistream.MultistreamListener(self._handlers)
                if not await _negotiate(stream, ms):
                    await stream.close()
                    return
        except (TimeoutError, ProtocolError, TransportError) as exc:
            self.note_stranger(
                logging.INFO,
                "a stream failed negotiation",
                stream.remote_peer_id.short(),
                str(exc) or "timed out",
            )
            await stream.reset()
            return
        assert ms.selected is not None
        stream.protocol = ms.selected
        stream.last_read = 0.0  # not read by its handler yet: first in line for the memory budget
        stream.unread(ms.unused_data)
        handler = self._handlers.get(ms.selected)
        if handler is None:
            await stream.reset()
            return
        try:
            await handler(stream)
            # A handler that returns is done with the stream: end our side, or the stream would stay open
            # on both hosts until the connection's stream limit refuses every new one.
            await stream.close()
        except (TransportError, asyncio.IncompleteReadError) as exc:
            self.note_stranger(
                logging.INFO, f"a {ms.selected} stream ended early", stream.remote_peer_id.short(), str(exc)
            )
            await stream.reset()
        except Exception:
            log.exception("%s handler for %s crashed", ms.selected, stream.remote_peer_id.short())
            await stream.reset()

    # ------------------------------------------------------------------ tasks, idle, shutdown

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back_memory(self) -> None:
        """The freed heap back to the kernel now and then (allocator.py): a burst of connections or
        parked streams must not leave the daemon larger once it is over."""
        while not self._closing:
            await asyncio.sleep(TRIM_INTERVAL_S)
            give_back_freed_memory()

    async def _reap_idle(self) -> None:
        interval = max(0.05, min(self.limits.idle_timeout_s / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._strangers.flush()
            for conn in list(self._all_conns):
                idle = conn.session is not None and not conn.streams
                if idle and now - conn.last_active > self.limits.idle_timeout_s:
                    log.debug("closing idle connection to %s", conn.who())
                    self._forget(conn)
                    self._spawn(conn.close(), "close idle")

    async def disconnect(self, peer_id: PeerID) -> None:
        conns = [c for c in self._all_conns if c.remote_peer_id == peer_id]
        for conn in conns:
            self._forget(conn)
        await asyncio.gather(*(c.close() for c in conns))

    async def close(self) -> None:
        """Stop listening, close every connection, cancel and await every task: nothing is left behind."""
        if self._closing:
            return
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._all_conns)
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._conns.clear()


async def _negotiate(
    stream: Stream, ms: multistream.MultistreamDialer | multistream.MultistreamListener
) -> bool:
    """Drives a multistream-select machine over `stream` to the end; False if the remote closed first."""
    while True:
        out = ms.data_to_send()
        if out:
            await stream.write(out)
        if ms.done:
            return True
        data = await stream.read()
        if not data:
            return False
        ms.receive_data(data)


def _source(conn: Connection) -> str:
    """Who a log line about a stranger names: its address, and its identity once proven."""
    ip = conn.remote_ip or str(conn.remote_addr or "?")
    return f"{ip} ({conn.remote_peer_id.short()})" if conn.remote_peer_id else ip
