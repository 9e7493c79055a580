"""Run the Host's secure channel (Noise XX + yamux) over something that is not a plain TCP connection.

A relayed circuit is a yamux stream inside the connection to the relay; a punched TCP socket is born
from a simultaneous open rather than from `connect()` or `accept()`. Both become Host connections the
same way: wrap the byte pipe in an `asyncio.Transport`, hand it to the Host's connection protocol, run
the libp2p upgrade (the relay sees only ciphertext), register the result as a connection to the peer.

`attach()` does this through the Host's hooks for other transports: `new_connection`, `adopt`,
`discard`, `prefer` and `connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from ..connection import cap_unsent
from ..errors import ConnectionClosedError, DuplicateIdentityError, ProtocolError, TransportError
from ..host import Host, Stream
from ..identity import PeerID
from ..multiaddr import Multiaddr

log = logging.getLogger(__name__)

# Bytes the stream transport queues before it asks the connection to pause writing: a few Noise frames,
# enough to keep a relayed stream busy, bounded so a slow relay cannot make us buffer a whole payload.
STREAM_WRITE_HIGH = 512 * 1024
# What a punched socket may receive before the upgrade takes it over: the peer's first handshake
# messages (a Noise message is at most 64 KiB).
HOLDING_LIMIT = 128 * 1024


class StreamTransport(asyncio.Transport):
    """An `asyncio.Transport` over a Host `Stream`: what the relay circuit looks like to a connection."""

    def __init__(self, stream: Stream, path: str) -> None:
        super().__init__()
        self._stream = stream
        self._path = path
        self._protocol: asyncio.BaseProtocol | None = None
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._high = STREAM_WRITE_HIGH
        self._paused = False
        self._closing = False
        self._lost = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._pump_in(), name=f"{self._path} reader"),
            loop.create_task(self._pump_out(), name=f"{self._path} writer"),
        ]

    async def _pump_in(self) -> None:
        error: Exception | None = None
        try:
            while data := await self._stream.read():
                assert self._protocol is not None
                deliver(self._protocol, data)
        except (TransportError, OSError) as exc:
            error = exc
        self._connection_lost(error)

    async def _pump_out(self) -> None:
        try:
            while True:
                while not self._pending:
                    if self._closing:
                        await self._stream.close()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                data = self._pending.popleft()
                await self._stream.write(data)
                self._pending_size -= len(data)
                if self._paused and self._pending_size <= self._high // 2:
                    self._paused = False
                    if self._protocol is not None:
                        self._protocol.resume_writing()
        except (TransportError, OSError) as exc:
            self._connection_lost(exc)

    def _connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self._protocol is not None:
            self._protocol.connection_lost(error)

    # ------------------------------------------------------------------ asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        self._wake.set()
        if not self._paused and self._pending_size > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = min(high or STREAM_WRITE_HIGH, STREAM_WRITE_HIGH)

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then close the stream (the relay passes the FIN on)."""
        if not self._closing:
            self._closing = True
            self._wake.set()

    def abort(self) -> None:
        self._pending.clear()
        reset_now(self._stream)
        self._connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "shoal_path":
            return self._path
        return default

    def is_reading(self) -> bool:
        return not self._lost

    def pause_reading(self) -> None:  # the stream's own window already holds the sender back
        pass

    def resume_reading(self) -> None:
        pass

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand `data` to a protocol the way the event loop would (Buffered or plain)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            # typeshed types get_buffer() as a ReadableBuffer; the protocol hands out a writable one
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


def reset_now(stream: Stream) -> None:
    """`stream.reset()` from synchronous code: it never suspends, so drive it to its end here."""
    coro = stream.reset()
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()


class Holding(asyncio.Protocol):  # plain: the Host's protocol takes over the bytes later
    """Holds what a fresh socket receives until `attach()` hands the socket to a Host connection."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        if len(self.data) + len(data) > HOLDING_LIMIT:
            log.warning("dropping a punched connection that sent %d bytes before its upgrade", len(self.data))
            self.lost = True
            return
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def attach(
    host: Host,
    transport: asyncio.BaseTransport,
    *,
    initiator: bool,
    expected: PeerID | None,
    path: str,
    early: bytes = b"",
) -> Any:
    """Upgrade `transport` to a secure Host connection to `expected` and register it; returns it.

    `initiator` picks the Noise and multistream roles: exactly one side of a pipe must pass True.
    A socket transport comes with a `Holding` protocol; `early` holds what it received meanwhile.
    """
    conn = host.new_connection(inbound=not initiator)
    conn.transport = transport  # type: ignore[assignment]
    conn.path = path
    if isinstance(transport, StreamTransport) or hasattr(transport, "start"):  # our own transports
        transport.start(conn)
    else:
        transport.set_write_buffer_limits(high=host.limits.write_buffer_high)  # type: ignore[attr-defined]
        cap_unsent(transport.get_extra_info("socket"))  # a punched TCP socket: as Connection does
        with contextlib.suppress(Exception):
            peer = transport.get_extra_info("peername")
            conn.remote_addr = Multiaddr.from_tcp(peer[0], peer[1])
        holding = transport.get_protocol()
        transport.set_protocol(conn)
        if isinstance(holding, Holding):
            early = bytes(holding.data) + early
            if holding.lost:
                conn.connection_lost(None)
        if early:
            conn.data_received(early)
    try:
        async with asyncio.timeout(host.limits.handshake_timeout_s):
            await conn.upgrade(expected)
    except (TimeoutError, ProtocolError, ConnectionClosedError) as exc:
        conn.abort(f"upgrade over {path} failed: {exc}")
        host.discard(conn)
        raise TransportError(f"secure upgrade over the {path} path failed: {exc or 'timed out'}") from exc
    except BaseException:
        conn.abort("cancelled")
        host.discard(conn)
        raise
    if conn.remote_peer_id == host.peer_id:
        conn.abort("the remote uses our own key")
        raise DuplicateIdentityError(f"the {path} peer uses our own key {host.peer_id}")
    host.adopt(conn)
    log.debug("secure %s connection to %s", path, conn.who())
    return conn


def prefer(host: Host, conn: Any) -> None:
    """Make `conn` the connection new streams to its peer use (a punched path replacing a relay)."""
    host.prefer(conn)


def connection_to(host: Host, peer: PeerID) -> Any | None:
    return host.connection(peer)


def path_of(conn: Any) -> str:
    return getattr(conn, "path", "direct")
