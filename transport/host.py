"""The asyncio host: listen, dial, upgrade connections, open and accept streams.

Each TCP connection is upgraded exactly as libp2p specifies: multistream-select picks `/noise`, the
Noise XX handshake proves both identities, multistream-select (now encrypted) picks `/yamux/1.0.0`, and
every yamux stream negotiates its own protocol with multistream-select again. The protocol logic lives in
the sans-I/O cores (`multistream`, `noise`, `yamux`); this module only moves bytes and wakes tasks.

The hot path runs in protocol callbacks, not in stream-reader tasks: the socket reads into the
connection's buffer, and `buffer_updated` decrypts Noise frames there, parses yamux frames and appends
payloads to the streams' buffers without waking a task per frame. Writers encrypt in their own task
and wait on yamux windows and on the socket's write buffer.

Tasks (handshakes, stream handlers) are tracked by the host and cancelled and awaited by `close()`: the
host's lifetime is not one lexical block, so a TaskGroup cannot hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from . import identify as identify_proto
from . import multistream, noise, yamux
from .allocator import keep_freed_memory
from .errors import (
    ConnectionClosedError,
    DuplicateIdentityError,
    LimitError,
    NegotiationError,
    PeerIDMismatchError,
    ProtocolError,
    StreamClosedError,
    StreamResetError,
    TransportError,
)
from .identity import PeerID, PublicKey, encode_public_key, peer_id_from_key
from .multiaddr import Multiaddr

log = logging.getLogger(__name__)

PING_PROTOCOL_ID = "/ipfs/ping/1.0.0"
# Offered inside the Noise handshake (libp2p's inlined muxer negotiation); yamux is the only one we speak.
MUXERS = [yamux.PROTOCOL_ID]
PING_SIZE = 32
# Bytes encrypted per step of one write() before checking the socket's buffer: keeps the buffers in
# flight few and hot in cache, and lets other tasks run between steps.
WRITE_CHUNK = 1024 * 1024
# Receive buffer once the session runs: room for a partial frame plus at least one whole frame per read;
# bulk transfers get the large one (fewer, bigger reads: ~16 frames per read).
RECV_BUFFER_SMALL = 3 * (noise.MAX_FRAME_LENGTH + 2)
RECV_BUFFER_LARGE = 1024 * 1024 + 2 * (noise.MAX_FRAME_LENGTH + 2)
# Socket reads during the upgrade: handshake messages are small.
RAW_READ_SIZE = 65536
# TCP keepalive: a silent peer is probed after 60 s and dropped after 3 unanswered probes 15 s apart,
# well inside a training round's deadline scale but far above a healthy peer's quiet periods.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_PROBES = 3
# How long a closing connection may take to flush its GO_AWAY before the socket is aborted.
CLOSE_GRACE_S = 0.5


@dataclass(frozen=True)
class HostLimits:
    """Limits and timeouts; defaults suit a daemon with a few dozen partners on the internet."""

    # Open connections (both directions). Shoal talks to one partner a round plus DHT neighbours.
    max_connections: int = 256
    # Inbound TCP connections still in their handshake: bounds the work an unauthenticated flood costs.
    max_pending_handshakes: int = 64
    # Streams open at once on one connection (both directions); above it SYNs are answered with RST.
    max_streams_per_connection: int = yamux.DEFAULT_MAX_STREAMS
    # Largest per-stream receive window: the most a peer may send on one stream before our reader
    # consumes it. 16 MiB keeps a 1 Gbit/s x 100 ms path full. Windows start at 256 KiB and grow only
    # while the reader keeps up, so a connection whose handlers do not read holds 256 KiB per stream.
    stream_window: int = 16 * 1024 * 1024
    # TCP connect plus Noise plus muxer negotiation; a peer slower than this is unusable for training.
    handshake_timeout_s: float = 10.0
    # multistream-select on a new stream.
    negotiate_timeout_s: float = 10.0
    # A connection with no open stream for this long is closed (the DHT redials cheaply).
    idle_timeout_s: float = 300.0
    # Bytes one socket may queue in user space before writers wait (on top of the kernel's buffer).
    write_buffer_high: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not yamux.INITIAL_WINDOW <= self.stream_window <= yamux.MAX_WINDOW:
            raise ValueError(
                f"stream_window must be in {yamux.INITIAL_WINDOW}..{yamux.MAX_WINDOW} bytes, "
                f"got {self.stream_window}"
            )
        for name in ("max_connections", "max_pending_handshakes", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("handshake_timeout_s", "negotiate_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class _Waiter:
    """One future at a time for 'something changed' wake-ups (data arrived, window opened, drained)."""

    future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)
        self.future = None

    async def wait(self) -> None:
        if self.future is None or self.future.done():  # done: a previous waiter was cancelled
            self.future = asyncio.get_running_loop().create_future()
        await self.future


class Stream:
    """One yamux stream after protocol negotiation: a bidirectional, flow-controlled byte stream."""

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.protocol = ""
        self.remote_peer_id: PeerID = conn.remote_peer_id  # type: ignore[assignment]
        self._chunks: deque[bytes | memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._error: TransportError | None = None
        self._write_closed = False
        self._readable = _Waiter()
        self._writable = _Waiter()

    # ------------------------------------------------------------------ fed by the connection

    def _feed(self, data: memoryview) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._readable.wake()

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        self._readable.wake()
        self._writable.wake()

    def _window_opened(self) -> None:
        self._writable.wake()

    def _unread(self, data: bytes) -> None:
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    # ------------------------------------------------------------------ reading

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes, or for n < 0 the next chunk that arrived (at most one yamux frame, returned
        without a copy); b"" once the peer closed its side and everything was read."""
        if n == 0:
            return b""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._readable.wait()
        chunks = self._chunks
        if n < 0:
            first = chunks.popleft()
            data = first if type(first) is bytes else bytes(first)
        else:
            parts: list[bytes | memoryview] = []
            size = 0
            while chunks and size < n:
                chunk = chunks[0]
                need = n - size
                if len(chunk) <= need:
                    parts.append(chunks.popleft())
                    size += len(chunk)
                else:
                    view = memoryview(chunk)
                    parts.append(view[:need])
                    chunks[0] = view[need:]
                    size = n
            first = parts[0]
            data = first if len(parts) == 1 and type(first) is bytes else b"".join(parts)
        self._buffered -= len(data)
        self._conn._consumed(self.stream_id, len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes; asyncio.IncompleteReadError if the stream ends first.

        Consumes as data arrives (not once all `n` are buffered), so `n` may exceed the flow-control
        window without deadlocking the sender.
        """
        if self._buffered >= n:
            return await self.read(n)
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    # ------------------------------------------------------------------ writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`, waiting whenever the peer's window is full (its reader is slower than us)."""
        view = memoryview(data).cast("B")  # slices of a view copy nothing
        sent = 0
        while sent < len(view):
            if self._error is not None:
                raise self._error
            if self._write_closed:
                raise StreamClosedError(f"stream {self.protocol} to {self.remote_peer_id.short()} was closed")
            taken = self._conn._send_data(self.stream_id, view[sent : sent + WRITE_CHUNK])
            sent += taken
            if taken == 0:
                await self._writable.wait()
            else:
                await self._conn._drain()

    async def close(self) -> None:
        """Half-close: we send no more; the peer may still send until it closes too."""
        if not self._write_closed and self._error is None:
            self._write_closed = True
            self._conn._send_fin(self.stream_id)

    async def reset(self) -> None:
        """Abort both directions at once; the peer's reads and writes fail with StreamResetError."""
        if self._error is None:
            self._conn._reset_stream(self.stream_id)
            self._fail(
                StreamResetError(f"stream {self.protocol} to {self.remote_peer_id.short()} was reset by us")
            )

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection: raw bytes during the upgrade, then Noise frames carrying a yamux session.

    A BufferedProtocol: the socket reads straight into our receive buffer and frames are decrypted
    from there, which saves the event loop's copy of every received byte into a fresh bytes object.
    """

    def __init__(self, host: Host, *, inbound: bool) -> None:
        self.host = host
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.remote_peer_id: PeerID | None = None
        self.remote_addr: Multiaddr | None = None
        self.local_addr: Multiaddr | None = None
        self.path = "direct"  # how the bytes travel: direct TCP, or a NAT path (see transport/nat)
        self._raw = bytearray()  # bytes received during the upgrade, before the session runs
        self._raw_buffer = memoryview(bytearray(RAW_READ_SIZE))
        # Ciphertext received once the session runs. Small while the connection carries little (a DHT
        # neighbour costs ~200 KiB, not a megabyte); grown once a read fills it, i.e. on bulk transfer.
        self._rbuf = bytearray(RECV_BUFFER_SMALL)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0  # start of the first incomplete frame
        self._rend = 0  # end of the received bytes
        self._read_filled = False  # the last read filled all the room we offered
        self._raw_event = _Waiter()
        self._noise: noise.NoiseTransport | None = None
        self.session: yamux.YamuxSession | None = None
        self.streams: dict[int, Stream] = {}
        self._paused = False
        self._drained = _Waiter()
        self.closed = asyncio.get_running_loop().create_future()
        self._close_reason: str | None = None
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(high=self.host.limits.write_buffer_high)
        _enable_keepalive(transport.get_extra_info("socket"))
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        with contextlib.suppress(Exception):
            self.remote_addr = Multiaddr.from_tcp(peer[0], peer[1])
            self.local_addr = Multiaddr.from_tcp(sock[0], sock[1])
        self.host._connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.session is None:
            return self._raw_buffer
        if self._read_filled and len(self._rbuf) < RECV_BUFFER_LARGE:
            size = self._rend - self._rstart
            bigger = bytearray(RECV_BUFFER_LARGE)
            bigger[:size] = self._rview[self._rstart : self._rend]
            self._rview.release()
            self._rbuf, self._rview = bigger, memoryview(bigger)
            self._rstart, self._rend = 0, size
        if len(self._rbuf) - self._rend < noise.MAX_FRAME_LENGTH + 2:
            # Move the incomplete frame (less than one frame) to the front to make room.
            size = self._rend - self._rstart
            self._rbuf[:size] = self._rbuf[self._rstart : self._rend]
            self._rstart, self._rend = 0, size
        return self._rview[self._rend :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.session is None:
            self._raw += self._raw_buffer[:nbytes]
            if len(self._raw) > 4 * noise.MAX_FRAME_LENGTH:
                self._abort("sent too much before the handshake finished")
                return
            self._raw_event.wake()
            return
        self._read_filled = self._rend + nbytes == len(self._rbuf)
        self._rend += nbytes
        assert self._noise is not None
        try:
            plaintexts, used = self._noise.decrypt_frames(self._rview[self._rstart : self._rend])
            self._rstart += used
            if self._rstart == self._rend:
                self._rstart = self._rend = 0
            self._on_plaintexts(plaintexts)
        except ProtocolError as exc:
            self._protocol_error(exc)

    def data_received(self, data: bytes) -> None:
        """Bytes from a transport that is not a socket (a relayed stream, bytes replayed by a hole
        punch): copied into the receive buffer and processed as a socket read would be."""
        view = memoryview(data)
        pos = 0
        while pos < len(view) and self._close_reason is None:
            buffer = self.get_buffer(len(view) - pos)
            size = min(len(buffer), len(view) - pos)
            buffer[:size] = view[pos : pos + size]
            self.buffer_updated(size)
            pos += size

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._close_reason or (f"socket error: {exc}" if exc else "closed by the peer")
        error = ConnectionClosedError(f"connection to {self._who()} closed ({reason})")
        for stream in list(self.streams.values()):
            stream._fail(StreamResetError(f"stream {stream.protocol} reset: {error}"))
        self.streams.clear()
        self._raw_event.wake()
        self._drained.wake()
        if not self.closed.done():
            self.closed.set_result(None)
        self.host._connection_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._drained.wake()

    # ------------------------------------------------------------------ upgrade (runs in a task)

    async def _next_raw(self) -> bytes:
        while not self._raw:
            if self.closed.done():
                raise ConnectionClosedError(f"connection to {self._who()} closed during the handshake")
            await self._raw_event.wait()
        data = bytes(self._raw)
        self._raw.clear()
        return data

    def _write_raw(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def upgrade(self, expected: PeerID | None) -> None:
        """multistream(/noise) -> Noise XX -> yamux, agreed inside Noise or by multistream-select.

        Round trips saved, both within the specs: the dialer sends Noise message 1 right behind its
        only proposal (multistream's optimistic "lazy" select), and both sides offer yamux in the Noise
        handshake's extensions (libp2p's inlined muxer negotiation), falling back to a multistream
        exchange when the peer does not (py-libp2p 0.8.1 does not).
        """
        key = self.host._key
        handshake = noise.NoiseHandshake(
            initiator=not self.inbound,
            identity_key=key,
            expected_peer=expected,
            muxers=MUXERS,
            static=self.host._noise_static,
        )
        held = b""  # the listener's last multistream answer, sent together with Noise message 2
        if self.inbound:
            listen = multistream.MultistreamListener([noise.PROTOCOL_ID])
            self._write_raw(listen.data_to_send())  # our header at once: some dialers wait for it
            while not listen.done:
                listen.receive_data(await self._next_raw())
                out = listen.data_to_send()
                if listen.done:
                    held = out
                else:
                    self._write_raw(out)
            rest = listen.unused_data
        else:
            select = multistream.MultistreamDialer([noise.PROTOCOL_ID])
            self._write_raw(select.data_to_send() + handshake.data_to_send())
            while not select.done:
                select.receive_data(await self._next_raw())
            rest = select.unused_data
        if rest:
            handshake.receive_data(rest)
        while True:
            self._write_raw(held + handshake.data_to_send())
            held = b""
            if handshake.done:
                break
            handshake.receive_data(await self._next_raw())
        self._noise = handshake.transport()
        self.remote_peer_id = handshake.remote_peer_id
        pending = handshake.unused_data
        leftover = b""
        if handshake.selected_muxer != yamux.PROTOCOL_ID:
            ms: multistream.MultistreamDialer | multistream.MultistreamListener
            if self.inbound:
                ms = multistream.MultistreamListener([yamux.PROTOCOL_ID])
            else:
                ms = multistream.MultistreamDialer([yamux.PROTOCOL_ID])
            while True:
                out = ms.data_to_send()
                if out:
                    self._write_raw(self._noise.encrypt_frame(out))
                if ms.done:
                    break
                for plaintext in self._noise.receive_data(pending or await self._next_raw()):
                    ms.receive_data(plaintext)
                pending = b""
            leftover = ms.unused_data
        limits = self.host.limits
        self.session = yamux.YamuxSession(
            is_client=not self.inbound,
            window=limits.stream_window,
            max_streams=limits.max_streams_per_connection,
        )
        # From here on the socket feeds our receive buffer; replay what arrived meanwhile.
        if leftover:
            self._dispatch(self.session.receive_data(leftover))
        tail = pending + bytes(self._raw)
        self._raw.clear()
        plaintexts = self._noise.receive_data(tail) if tail else []
        partial = self._noise.take_partial()
        self._raw_buffer = memoryview(b"")  # the handshake's read buffer is not needed any more
        self._rbuf[: len(partial)] = partial
        self._rstart, self._rend = 0, len(partial)
        self._on_plaintexts(plaintexts)

    # ------------------------------------------------------------------ running session

    def _on_plaintexts(self, plaintexts: list[bytes]) -> None:
        assert self.session is not None
        session = self.session
        for plaintext in plaintexts:
            self._dispatch(session.receive_data(plaintext))
        self.last_active = time.monotonic()
        self._flush()

    def _dispatch(self, events: list[yamux.Event]) -> None:
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is yamux.DataReceived:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._feed(event.data)  # type: ignore[union-attr]
            elif kind is yamux.WindowUpdated:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._window_opened()
            elif kind is yamux.StreamOpened:
                stream = Stream(self, event.stream_id)  # type: ignore[union-attr]
                streams[event.stream_id] = stream  # type: ignore[union-attr]
                self.host._spawn(
                    self.host._serve_stream(stream), f"stream {event.stream_id} from {self._who()}"
                )  # type: ignore[union-attr]
            elif kind is yamux.StreamEnded:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._feed_eof()
                    self._forget_if_closed(event.stream_id)  # type: ignore[union-attr]
            elif kind is yamux.StreamReset:
                stream = streams.pop(event.stream_id, None)  # type: ignore[union-attr]
                if stream is not None:
                    stream._fail(StreamResetError(f"stream {stream.protocol} reset by {self._who()}"))
            elif kind is yamux.GoAwayReceived:
                log.info("peer %s is going away (code %d)", self._who(), event.code)  # type: ignore[union-attr]
                self.host._forget(self)

    def _flush(self) -> None:
        """Encrypt and send what the session queued. Control frames and headers share Noise frames;
        payload views are encrypted in place, 64 KiB at a time, and handed to writev without a copy."""
        if self.session is None or self._noise is None or self.transport is None:
            return
        frames = self.session.data_to_send()
        if not frames or self.transport.is_closing():
            return
        encrypt = self._noise.encrypt
        limit = noise.MAX_PLAINTEXT_LENGTH
        out: list[bytes] = []
        small: list[bytes] = []
        small_size = 0
        for frame in frames:
            if type(frame) is memoryview:
                if small:
                    encrypt(b"".join(small), out)
                    small, small_size = [], 0
                for offset in range(0, len(frame), limit):
                    encrypt(frame[offset : offset + limit], out)
                continue
            if small_size + len(frame) > limit:
                encrypt(b"".join(small), out)
                small, small_size = [], 0
            small.append(frame)  # type: ignore[arg-type]
            small_size += len(frame)
        if small:
            encrypt(b"".join(small), out)
        self.transport.writelines(out)

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("closing connection to %s: %s", self._who(), exc)
        if self.session is not None:
            self.session.go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
            with contextlib.suppress(ProtocolError):
                self._flush()
        self._abort(str(exc))

    def _abort(self, reason: str) -> None:
        self._close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ used by Stream

    def _consumed(self, stream_id: int, size: int) -> None:
        if self.session is not None:
            self.session.consumed(stream_id, size)
            self._flush()

    def _send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        if self.closed.done():
            raise ConnectionClosedError(f"connection to {self._who()} is closed")
        assert self.session is not None
        taken = self.session.send_data(stream_id, data)
        self._flush()
        self.last_active = time.monotonic()
        return taken

    async def _drain(self) -> None:
        while self._paused and not self.closed.done():
            await self._drained.wait()

    def _send_fin(self, stream_id: int) -> None:
        if self.session is not None and not self.closed.done():
            self.session.send_fin(stream_id)
            self._forget_if_closed(stream_id)
            self._flush()

    def _forget_if_closed(self, stream_id: int) -> None:
        """Both sides sent FIN: no more events will come for the stream (its reader keeps its data)."""
        if self.session is not None and not self.session.is_open(stream_id):
            self.streams.pop(stream_id, None)

    def _reset_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self.session is not None and not self.closed.done():
            self.session.reset_stream(stream_id)
            self._flush()

    def open_stream(self) -> Stream:
        if self.session is None or self.closed.done():
            raise ConnectionClosedError(f"connection to {self._who()} is closed")
        stream_id = self.session.open_stream()
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        self._flush()
        return stream

    async def close(self) -> None:
        if self.closed.done() or self.transport is None:
            return
        self._close_reason = "closed by us"
        if self.session is not None:
            self.session.go_away(yamux.GO_AWAY_NORMAL)
            self._flush()
        self.transport.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.transport.abort()
            await asyncio.shield(self.closed)

    def _who(self) -> str:
        peer = self.remote_peer_id.short() if self.remote_peer_id else "?"
        return f"{peer}@{self.remote_addr}"


class Host:
    """A Shoal peer's network endpoint: one identity, listeners, and at most one live connection per peer."""

    def __init__(self, key: ed25519.Ed25519PrivateKey, limits: HostLimits) -> None:
        self._key = key
        self.peer_id = peer_id_from_key(key)
        self._noise_static = noise.NoiseStatic(key, MUXERS)
        self.limits = limits
        self.listen_addrs: list[Multiaddr] = []
        self._servers: list[asyncio.Server] = []
        self._handlers: dict[str, Callable[[Stream], Awaitable[None]]] = {}
        self._conns: dict[PeerID, _Connection] = {}
        self._all_conns: set[_Connection] = set()
        self._dials: dict[PeerID, asyncio.Future[_Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_handshakes = 0
        self._closing = False
        # What peers told us through identify, and the addresses we know them by.
        self.peer_addrs: dict[PeerID, list[Multiaddr]] = {}
        self.observed_addrs: dict[PeerID, Multiaddr] = {}
        self.set_stream_handler(PING_PROTOCOL_ID, _serve_ping)
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
            server = await loop.create_server(lambda: _Connection(self, inbound=True), host, port)
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

    async def _dial(self, maddr: Multiaddr, expected: PeerID | None) -> _Connection:
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
        if len(self._all_conns) >= self.limits.max_connections:
            raise LimitError(f"already {self.limits.max_connections} connections open; cannot dial {maddr}")
        future: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
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

    async def _dial_once(self, maddr: Multiaddr, expected: PeerID | None) -> _Connection:
        host, port = maddr.tcp_endpoint()
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                _, proto = await loop.create_connection(lambda: _Connection(self, inbound=False), host, port)
                conn = proto
                await conn.upgrade(expected)
        except TimeoutError as exc:
            if conn is not None:
                conn._abort("handshake timed out")
            raise TransportError(
                f"dialing {maddr} timed out after {self.limits.handshake_timeout_s} s; is the peer up?"
            ) from exc
        except OSError as exc:
            raise TransportError(f"cannot reach {maddr}: {exc.strerror or exc}") from exc
        except (ProtocolError, ConnectionClosedError) as exc:
            if conn is not None:
                conn._abort(str(exc))
            if isinstance(exc, PeerIDMismatchError):
                raise
            raise TransportError(f"upgrading the connection to {maddr} failed: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn._abort("dial cancelled")
            raise
        assert conn.remote_peer_id is not None
        if conn.remote_peer_id == self.peer_id:
            conn._abort("the remote uses our own key")
            ours = ", ".join(map(str, self.listen_addrs)) or "no listen address"
            raise DuplicateIdentityError(
                f"another live daemon at {maddr} uses our key {self.peer_id} (we listen on {ours}); "
                "stop one of them or give it its own key with `peer keygen`"
            )
        self._register(conn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected to %s", conn._who())
        return conn

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
        self, peer_id: PeerID, protocol: str, addrs: Sequence[Multiaddr | str] = ()
    ) -> Stream:
        """Open a stream to `peer_id` speaking `protocol`, dialing one of `addrs` if not yet connected."""
        conn = self._conns.get(peer_id)
        if conn is None or conn.closed.done() or (conn.session and conn.session.go_away_received):
            conn = await self._connect_any(peer_id, addrs)
        stream = conn.open_stream()
        try:
            async with asyncio.timeout(self.limits.negotiate_timeout_s):
                ms = multistream.MultistreamDialer([protocol])
                while True:
                    out = ms.data_to_send()
                    if out:
                        await stream.write(out)
                    if ms.done:
                        break
                    data = await stream.read()
                    if not data:
                        raise NegotiationError(
                            f"{peer_id.short()} closed the stream while negotiating {protocol}"
                        )
                    ms.receive_data(data)
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
        stream._unread(ms.unused_data)
        return stream

    async def _connect_any(self, peer_id: PeerID, addrs: Sequence[Multiaddr | str]) -> _Connection:
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

    async def _serve_identify(self, stream: Stream) -> None:
        conn = stream._conn
        info = identify_proto.IdentifyInfo(
            public_key=PublicKey.from_protobuf(encode_public_key(self._key.public_key())),
            listen_addrs=list(self.listen_addrs),
            observed_addr=conn.remote_addr,
            protocols=self.protocols,
            protocol_version=identify_proto.PROTOCOL_VERSION,
            agent_version=identify_proto.AGENT_VERSION,
        )
        await stream.write(identify_proto.frame(info))
        await stream.close()

    # ------------------------------------------------------------------ inbound side

    def _connection_made(self, conn: _Connection) -> None:
        self._all_conns.add(conn)
        if not conn.inbound:
            return
        if self._closing:
            conn._abort("host is closing")
        elif len(self._all_conns) > self.limits.max_connections:
            log.warning(
                "refusing connection from %s: %d connections open", conn.remote_addr, len(self._all_conns) - 1
            )
            conn._abort("connection limit")
        elif self._pending_handshakes >= self.limits.max_pending_handshakes:
            log.warning("refusing connection from %s: too many handshakes in progress", conn.remote_addr)
            conn._abort("handshake limit")
        else:
            self._spawn(self._accept(conn), f"handshake with {conn.remote_addr}")

    async def _accept(self, conn: _Connection) -> None:
        self._pending_handshakes += 1
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                await conn.upgrade(None)
        except (TimeoutError, ProtocolError, ConnectionClosedError) as exc:
            log.info("inbound handshake from %s failed: %s", conn.remote_addr, exc or "timed out")
            conn._abort(f"handshake failed: {exc}")
            return
        finally:
            self._pending_handshakes -= 1
        if conn.remote_peer_id == self.peer_id:
            log.error(
                "another live daemon at %s uses our key %s; stop one of them (we listen on %s)",
                conn.remote_addr,
                self.peer_id,
                ", ".join(map(str, self.listen_addrs)),
            )
            conn._abort("duplicate identity")
            return
        with contextlib.suppress(ConnectionClosedError):  # the host closed meanwhile
            self._register(conn)

    def _register(self, conn: _Connection) -> None:
        assert conn.remote_peer_id is not None
        if self._closing:  # a dial that finished while close() ran: leave nothing behind
            conn._abort("host is closing")
            raise ConnectionClosedError(f"the host closed while connecting to {conn._who()}")
        # Keep the first live connection to a peer; a second one (simultaneous dial) still serves its
        # own streams until it idles out.
        current = self._conns.get(conn.remote_peer_id)
        if current is None or current.closed.done():
            self._conns[conn.remote_peer_id] = conn
        if not conn.inbound and conn.remote_addr is not None:
            known = self.peer_addrs.setdefault(conn.remote_peer_id, [])
            if conn.remote_addr not in known:
                known.append(conn.remote_addr)

    def _forget(self, conn: _Connection) -> None:
        if conn.remote_peer_id is not None and self._conns.get(conn.remote_peer_id) is conn:
            del self._conns[conn.remote_peer_id]

    def _connection_lost(self, conn: _Connection) -> None:
        self._all_conns.discard(conn)
        self._forget(conn)

    async def _serve_stream(self, stream: Stream) -> None:
        try:
            async with asyncio.timeout(self.limits.negotiate_timeout_s):
                ms = multistream.MultistreamListener(self._handlers)
                while True:
                    out = ms.data_to_send()
                    if out:
                        await stream.write(out)
                    if ms.done:
                        break
                    data = await stream.read()
                    if not data:
                        await stream.close()
                        return
                    ms.receive_data(data)
        except (TimeoutError, ProtocolError, TransportError) as exc:
            log.info(
                "stream from %s failed negotiation: %s", stream.remote_peer_id.short(), exc or "timed out"
            )
            await stream.reset()
            return
        assert ms.selected is not None
        stream.protocol = ms.selected
        stream._unread(ms.unused_data)
        handler = self._handlers.get(ms.selected)
        if handler is None:
            await stream.reset()
            return
        try:
            await handler(stream)
        except (TransportError, asyncio.IncompleteReadError) as exc:
            log.info("%s handler for %s ended: %s", ms.selected, stream.remote_peer_id.short(), exc)
            await stream.reset()
        except Exception:
            log.exception("%s handler for %s crashed", ms.selected, stream.remote_peer_id.short())
            await stream.reset()

    # ------------------------------------------------------------------ tasks, idle, shutdown

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_idle(self) -> None:
        interval = max(0.05, min(self.limits.idle_timeout_s / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self._all_conns):
                idle = conn.session is not None and not conn.streams
                if idle and now - conn.last_active > self.limits.idle_timeout_s:
                    log.debug("closing idle connection to %s", conn._who())
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


def _enable_keepalive(sock: socket.socket | None) -> None:
    """Let the kernel notice a peer that vanished without a FIN (power loss, a NAT that forgot us)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def _serve_ping(stream: Stream) -> None:
    """Echo 32-byte pings until the peer closes its side (the spec allows many pings per stream)."""
    while True:
        try:
            payload = await stream.readexactly(PING_SIZE)
        except asyncio.IncompleteReadError:
            break
        await stream.write(payload)
    await stream.close()
