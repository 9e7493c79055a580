"""One secure connection: Noise-encrypted yamux over a TCP socket, and the streams riding on it.

`Connection` is the asyncio protocol of one socket. During the upgrade it collects raw bytes for the
handshake task (multistream-select, Noise XX, muxer choice); afterwards the socket reads straight into
its receive buffer and `buffer_updated` decrypts Noise frames there, parses yamux frames and appends
payloads to the streams' buffers without waking a task per frame. `Stream` is what applications hold:
reads take from those buffers and grant the window back; writes encrypt in the writer's task and wait
on yamux windows and on the socket's write buffer. The `Host` (host.py) creates and owns connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from . import multistream, noise, yamux
from .errors import (
    ConnectionClosedError,
    NegotiationError,
    ProtocolError,
    StreamClosedError,
    StreamResetError,
    TransportError,
)
from .identity import PeerID
from .multiaddr import Multiaddr

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from .limits import HostLimits

log = logging.getLogger(__name__)

# Offered inside the Noise handshake (libp2p's inlined muxer negotiation); yamux is the only one we speak.
MUXERS = [yamux.PROTOCOL_ID]
# Bytes encrypted per step of one write() before checking the socket's buffer: keeps the buffers in
# flight few and hot in cache, lets other tasks run between steps, and bounds what one step adds to the
# queue that control frames wait behind (see UNSENT_LOWAT).
WRITE_CHUNK = 128 * 1024
# The kernel reports the socket writable only while fewer bytes than this wait unsent (TCP_NOTSENT_LOWAT;
# bytes in flight are not counted, so it does not cap the congestion window). Bulk data then waits in our
# small user-space buffer, not seconds deep in the kernel's, and what we send next (a window update for
# the partner's stream, an answer) leaves within about this many bytes' time: measured on a 20 Mbit/s
# shaped link, both directions of a 5.5 MB swap at once finished in 2.6 s instead of 3.3 (line: 2.3). 64 KiB
# rather than 128 (with write_buffer_high): requests beside a 10 MB swap at 10 Mbit/s were answered in 0.85 s
# instead of 1.29 (bench.link_control), the swaps took as long, loopback throughput stayed 0.68 of raw TCP.
UNSENT_LOWAT = 64 * 1024
# socket.TCP_NOTSENT_LOWAT where Python names it; Linux's number otherwise (Linux has it since 3.12); None
# where neither is known (the number means something else elsewhere).
TCP_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform == "linux" else None)
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


@dataclass
class _Waiter:
    """One future at a time for 'something changed' wake-ups (data arrived, window opened, drained)."""

    future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)
        self.future = None

    async def wait(self) -> None:
        if self.future is None or self.future.done():
            self.future = asyncio.get_running_loop().create_future()
        # Shielded: several tasks may wait on one future (every stream writing on a paused connection
        # waits for it to drain), and a waiter cancelled by its own deadline must not cancel the future
        # under the others: that ended an unrelated swap's write with CancelledError.
        await asyncio.shield(self.future)


class Stream:
    """One yamux stream after protocol negotiation: a bidirectional, flow-controlled byte stream."""

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.protocol = ""
        self.remote_peer_id: PeerID = conn.remote_peer_id  # type: ignore[assignment]
        self._chunks: deque[bytes | memoryview] = deque()
        self._buffered = 0
        # When our side last read (0.0: its handler never has): the memory budget resets the oldest first.
        self.last_read = time.monotonic()
        self._counted = True  # its unread bytes count in the host's memory budget (until its connection goes)
        self._eof = False
        self._error: TransportError | None = None
        self._write_closed = False
        self._readable = _Waiter()
        self._writable = _Waiter()
        # A lazy dialer's negotiation (Host.new_stream(lazy=True)): the listener's echo, read before any
        # of the protocol's bytes. None once agreed, and on every other stream.
        self._negotiating: multistream.MultistreamDialer | None = None

    @property
    def remote_addr(self) -> Multiaddr | None:
        """Where the connection this stream runs on came from (the address the remote was seen at)."""
        return self._conn.remote_addr

    # ------------------------------------------------------------------ fed by the connection

    def _feed(self, data: bytes | memoryview) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.wake()
        if self._counted:
            self._conn.host.on_buffered(len(data))

    @property
    def buffered(self) -> int:
        """Bytes the peer sent that our side has not read yet."""
        return self._buffered

    def _discard(self) -> None:
        """Drops what was received and not read (the stream is reset): the memory goes back at once."""
        self._uncount()
        self._chunks.clear()
        self._buffered = 0

    def _uncount(self) -> None:
        """Its connection is gone: what it holds is the reader's to finish, no longer the host's budget."""
        if self._counted:
            self._counted = False
            self._conn.host.on_buffered(-self._buffered)

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

    def unread(self, data: bytes) -> None:
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)
            if self._counted:
                self._conn.host.on_buffered(len(data))

    # ------------------------------------------------------------------ reading

    def negotiate_on_first_read(self, dialer: multistream.MultistreamDialer) -> None:
        """The stream's protocol was proposed and its first bytes may be written at once; the listener's
        answer is checked at the first read (NegotiationError when it refused or closed)."""
        self._negotiating = dialer

    async def _agree(self) -> None:
        dialer = self._negotiating
        assert dialer is not None
        self._negotiating = None
        peer = self.remote_peer_id.short()
        while not dialer.done:
            data = await self.read()
            if not data:
                raise NegotiationError(f"{peer} closed the stream while negotiating {self.protocol}")
            try:
                dialer.receive_data(data)
            except NegotiationError as exc:
                raise NegotiationError(f"peer {peer} does not speak {self.protocol}: {exc}") from exc
        self.unread(dialer.unused_data)

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes, or for n < 0 the next chunk that arrived (at most one yamux frame, returned
        without a copy); b"" once the peer closed its side and everything was read."""
        if self._negotiating is not None:
            await self._agree()
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
        self.last_read = time.monotonic()
        if self._counted:
            self._conn.host.on_buffered(-len(data))
        self._conn._consumed(self.stream_id, len(data))
        return data

    def expect(self, n: int) -> None:
        """We will read `n` more bytes of this stream as they arrive: the peer may send them all without
        waiting for the window to grow (yamux `Session.expect`; capped by the stream window limit)."""
        self._conn._expect(self.stream_id, n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes; asyncio.IncompleteReadError if the stream ends first.

        Consumes as data arrives (not once all `n` are buffered), so `n` may exceed the flow-control
        window without deadlocking the sender.
        """
        if self._buffered >= n and self._negotiating is None:
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
        self.reset_now("was reset by us")

    def reset_now(self, why: str) -> None:
        """`reset` without waiting: the host uses it to take back memory."""
        self._discard()
        if self._error is None:
            self._conn._reset_stream(self.stream_id)
            self._fail(StreamResetError(f"stream {self.protocol} to {self.remote_peer_id.short()} {why}"))

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()


class ConnectionOwner(Protocol):
    """What a connection asks of the host that owns it (transport/host.py's Host)."""

    limits: HostLimits
    identity_key: ed25519.Ed25519PrivateKey
    noise_static: noise.NoiseStatic

    def on_connection_made(self, conn: Connection) -> None: ...

    def on_connection_lost(self, conn: Connection) -> None: ...

    def on_stream_opened(self, stream: Stream) -> None: ...

    def on_going_away(self, conn: Connection) -> None: ...

    def note_stranger(self, level: int, what: str, source: str, why: str) -> None: ...

    def on_buffered(self, delta: int) -> None: ...


class Connection(asyncio.BufferedProtocol):
    """One TCP connection: raw bytes during the upgrade, then Noise frames carrying a yamux session.

    A BufferedProtocol: the socket reads straight into our receive buffer and frames are decrypted
    from there, which saves the event loop's copy of every received byte into a fresh bytes object.
    """

    def __init__(self, host: ConnectionOwner, *, inbound: bool) -> None:
        self.host = host
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.remote_peer_id: PeerID | None = None
        self.remote_addr: Multiaddr | None = None
        self.remote_ip: str | None = None  # the socket's peer address, for per-address shares
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
        # A stream protocol's transport is an asyncio.Transport in all but name: uvloop's transports are
        # not subclasses of it, and BaseProtocol.connection_made is typed with BaseTransport.
        stream_transport = cast(asyncio.Transport, transport)
        self.transport = stream_transport
        stream_transport.set_write_buffer_limits(high=self.host.limits.write_buffer_high)
        _enable_keepalive(transport.get_extra_info("socket"))
        cap_unsent(transport.get_extra_info("socket"))
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        with contextlib.suppress(Exception):
            self.remote_ip = str(peer[0])
            self.remote_addr = Multiaddr.from_tcp(peer[0], peer[1])
            self.local_addr = Multiaddr.from_tcp(sock[0], sock[1])
        self.host.on_connection_made(self)

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
                self.abort("sent too much before the handshake finished")
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
        error = ConnectionClosedError(f"connection to {self.who()} closed ({reason})")
        for stream in list(self.streams.values()):
            stream._uncount()  # its reader may still finish what arrived; it holds it, not the host
            stream._fail(StreamResetError(f"stream {stream.protocol} reset: {error}"))
        self.streams.clear()
        self._raw_event.wake()
        self._drained.wake()
        if not self.closed.done():
            self.closed.set_result(None)
        self.host.on_connection_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._drained.wake()

    # ------------------------------------------------------------------ upgrade (runs in a task)

    async def _next_raw(self) -> bytes:
        while not self._raw:
            if self.closed.done():
                raise ConnectionClosedError(f"connection to {self.who()} closed during the handshake")
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
        key = self.host.identity_key
        handshake = noise.NoiseHandshake(
            initiator=not self.inbound,
            identity_key=key,
            expected_peer=expected,
            muxers=MUXERS,
            static=self.host.noise_static,
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
            if isinstance(event, yamux.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._feed(event.data)
            elif isinstance(event, yamux.WindowUpdated):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._window_opened()
            elif isinstance(event, yamux.StreamOpened):
                stream = Stream(self, event.stream_id)
                streams[event.stream_id] = stream
                self.host.on_stream_opened(stream)
            elif isinstance(event, yamux.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._feed_eof()
                    self._forget_if_closed(event.stream_id)
            elif isinstance(event, yamux.StreamReset):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._fail(StreamResetError(f"stream {stream.protocol} reset by {self.who()}"))
            elif isinstance(event, yamux.GoAwayReceived):
                self.host.note_stranger(
                    logging.INFO, "a peer is going away", self.who(), f"code {event.code}"
                )
                self.host.on_going_away(self)

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
            small.append(frame)
            small_size += len(frame)
        if small:
            encrypt(b"".join(small), out)
        self.transport.writelines(out)

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.host.note_stranger(logging.WARNING, "closing a connection", self.who(), str(exc))
        if self.session is not None:
            self.session.go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
            with contextlib.suppress(ProtocolError):
                self._flush()
        self.abort(str(exc))

    def abort(self, reason: str) -> None:
        self._close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ used by Stream

    def _consumed(self, stream_id: int, size: int) -> None:
        if self.session is not None:
            self.session.consumed(stream_id, size)
            self._flush()

    def _expect(self, stream_id: int, size: int) -> None:
        if self.session is not None and not self.closed.done():
            self.session.expect(stream_id, size)
            self._flush()

    def _send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        if self.closed.done():
            raise ConnectionClosedError(f"connection to {self.who()} is closed")
        assert self.session is not None
        taken = self.session.send_data(stream_id, data)
        self._flush()
        self.last_active = time.monotonic()
        return taken

    async def _drain(self) -> None:
        """After a write: if the socket's buffer is over its high-water mark, wait until it has drained
        once. Once, not until it is below the mark: a bulk writer refills the buffer as soon as it drains,
        so a writer that waited for "not paused" (a protocol answer, a window update's stream, a status
        request) waited until the bulk transfer was over, 3 s of a 20 MB transfer at 100 Mbit/s and past
        the 10 s negotiation deadline at 10 Mbit/s. Waiting once, the writers take turns, a chunk each."""
        if self._paused and not self.closed.done():
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
            raise ConnectionClosedError(f"connection to {self.who()} is closed")
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

    def who(self) -> str:
        peer = self.remote_peer_id.short() if self.remote_peer_id else "?"
        return f"{peer}@{self.remote_addr}"


def _enable_keepalive(sock: socket.socket | None) -> None:
    """Let the kernel notice a peer that vanished without a FIN (power loss, a NAT that forgot us)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def cap_unsent(sock: socket.socket | None) -> None:
    """Keep the kernel's unsent queue shallow (UNSENT_LOWAT): where the option is missing (not Linux),
    only the user-space buffer is small, and control frames may wait behind the kernel's buffer."""
    if TCP_NOTSENT_LOWAT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, UNSENT_LOWAT)
