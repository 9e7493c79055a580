"""yamux, sans-I/O: many flow-controlled streams over one secure connection.

Spec: https://github.com/hashicorp/yamux/blob/master/spec.md, as libp2p uses it ("/yamux/1.0.0",
https://github.com/libp2p/specs/blob/master/yamux/yamux.md). Every frame has a 12-byte header
(version, type, flags, stream id, length); DATA frames carry `length` bytes of payload.

Flow control is per stream: a sender may have at most the receiver's window in flight. The receiver
grants more (WINDOW_UPDATE) only as its application consumes data (`consumed()`), so a slow reader
slows the writer and nothing is dropped or timed out. Each stream starts at the spec's 256 KiB window, which
grows (up to the configured maximum) as its reader drains it.

A frame that breaks the rules (more data than the window, unknown type, SYN for a live stream) raises
`ProtocolError`; the driver then sends GO_AWAY(protocol error) and closes the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import LimitError, ProtocolError, StreamClosedError, StreamResetError

PROTOCOL_ID = "/yamux/1.0.0"
VERSION = 0
TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8
GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

HEADER = struct.Struct(">BBHII")
HEADER_LENGTH = HEADER.size
# The spec's initial window; a stream may not send more before the first window update arrives.
INITIAL_WINDOW = 256 * 1024
# Largest window we accept to grant: 2**32 - 1 is the field's limit; 64 MiB already fills any link's BDP
# that one Python process can drive, and bounds memory a peer can make us buffer on one stream.
MAX_WINDOW = 64 * 1024 * 1024
# Default payload per DATA frame: the initial window, so one header covers four full Noise frames.
DEFAULT_MAX_DATA_FRAME = INITIAL_WINDOW
# How many streams one connection may hold open at once (both directions together), as go-yamux's
# default accept backlog bounds its memory.
DEFAULT_MAX_STREAMS = 256
# Outbound control frames queued while the application does not flush: pings and window updates from a
# hostile peer's flood must not grow without bound.
MAX_PENDING_CONTROL_FRAMES = 4096


@dataclass(slots=True)
class StreamOpened:
    stream_id: int


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamEnded:
    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int


@dataclass(slots=True)
class WindowUpdated:
    stream_id: int


@dataclass(slots=True)
class PongReceived:
    opaque: int


@dataclass(slots=True)
class GoAwayReceived:
    code: int


Event = (
    StreamOpened | DataReceived | StreamEnded | StreamReset | WindowUpdated | PongReceived | GoAwayReceived
)


class _StreamState:
    __slots__ = ("local_closed", "recv_credit", "recv_window", "remote_closed", "send_window", "window")

    def __init__(self) -> None:
        self.send_window = INITIAL_WINDOW  # what the peer lets us send
        self.window = INITIAL_WINDOW  # our current receive window for this stream (grows, see consumed)
        self.recv_window = INITIAL_WINDOW  # what the peer may still send before we grant more
        self.recv_credit = 0  # consumed by our application, not yet granted back
        self.local_closed = False
        self.remote_closed = False


class YamuxSession:
    """One side of a yamux session. `is_client` is the dialer: it uses odd stream ids."""

    def __init__(
        self,
        *,
        is_client: bool,
        window: int = 4 * 1024 * 1024,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_data_frame: int = DEFAULT_MAX_DATA_FRAME,
    ) -> None:
        if not INITIAL_WINDOW <= window <= MAX_WINDOW:
            raise ValueError(f"yamux window must be in {INITIAL_WINDOW}..{MAX_WINDOW}, got {window}")
        self.is_client = is_client
        self._window = window
        self._max_streams = max_streams
        self._max_data_frame = max_data_frame
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _StreamState] = {}
        # Control frames and headers are bytes; DATA payloads are memoryviews of the caller's buffer,
        # valid until the driver's next flush (the driver encrypts them before returning to the caller).
        self._out: list[bytes | memoryview] = []
        self._control_frames = 0
        self._header_buf = bytearray()  # a frame header split across two reads
        self._payload_left = 0  # payload bytes of the current DATA frame still to come
        self._payload_stream: int | None = None  # None: skip the payload (stream unknown or reset)
        self._payload_flags = 0
        self._ping_id = 0
        self.go_away_sent = False
        self.go_away_received = False

    # ------------------------------------------------------------------ sending side

    def data_to_send(self) -> list[bytes | memoryview]:
        out = self._out
        self._out = []
        self._control_frames = 0
        return out

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def open_stream(self) -> int:
        if self.go_away_received or self.go_away_sent:
            raise LimitError("the connection is going away; open a stream on a new connection")
        if len(self._streams) >= self._max_streams:
            raise LimitError(f"connection already holds {self._max_streams} streams; close some first")
        stream_id = self._next_id
        if stream_id > 0xFFFFFFFF:
            raise LimitError("stream ids exhausted on this connection; reconnect")
        self._next_id += 2
        self._streams[stream_id] = _StreamState()
        self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0))
        return stream_id

    def is_open(self, stream_id: int) -> bool:
        """False once the stream was reset or closed by both sides."""
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        state = self._streams.get(stream_id)
        return state.send_window if state is not None else 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as the peer's window allows; returns how many bytes were taken."""
        state = self._live(stream_id)
        if state.local_closed:
            raise StreamClosedError(f"stream {stream_id} was already closed for writing")
        total = min(len(data), state.send_window)
        taken = 0
        while taken < total:
            size = min(total - taken, self._max_data_frame)
            self._out.append(HEADER.pack(VERSION, TYPE_DATA, 0, stream_id, size))
            self._out.append(memoryview(data)[taken : taken + size])
            taken += size
        state.send_window -= taken
        return taken

    def send_fin(self, stream_id: int) -> None:
        state = self._streams.get(stream_id)
        if state is None or state.local_closed:
            return
        state.local_closed = True
        self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0))
        self._maybe_forget(stream_id, state)

    def reset_stream(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    def consumed(self, stream_id: int, size: int) -> None:
        """The application read `size` bytes of the stream: grant them back once it is worth a frame.

        The window starts at the spec's 256 KiB and doubles, up to the configured maximum, each time
        the reader drains half of it: memory is committed only to streams whose reader keeps up, so a
        peer cannot park the maximum window on every stream of a handler that does not read.
        """
        state = self._streams.get(stream_id)
        if state is None or state.remote_closed:
            return
        state.recv_credit += size
        # Batch updates: one frame per half window consumed, as go-yamux does.
        if state.recv_credit >= state.window // 2:
            delta = state.recv_credit
            if state.window < self._window:
                growth = min(state.window, self._window - state.window)
                state.window += growth
                delta += growth
            state.recv_window += delta
            state.recv_credit = 0
            self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, 0, stream_id, delta))

    def expect(self, stream_id: int, size: int) -> None:
        """The application will read `size` more bytes of the stream as they come (a transfer of known
        length, read straight into its destination): open the window to that much at once, up to the
        configured maximum, instead of letting it double from 256 KiB a round trip at a time. On a 50 ms,
        100 Mbit/s path the doubling costs two or three round trips of a 5 MB transfer."""
        state = self._streams.get(stream_id)
        if state is None or state.remote_closed:
            return
        target = min(max(size, INITIAL_WINDOW), self._window)
        if target <= state.window:
            return
        delta = target - state.window + state.recv_credit
        state.window = target
        state.recv_window += delta
        state.recv_credit = 0
        self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, 0, stream_id, delta))

    def ping(self) -> int:
        self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        self._out.append(HEADER.pack(VERSION, TYPE_PING, FLAG_SYN, 0, self._ping_id))
        return self._ping_id

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        if not self.go_away_sent:
            self.go_away_sent = True
            self._out.append(HEADER.pack(VERSION, TYPE_GO_AWAY, 0, 0, code))

    # ------------------------------------------------------------------ receiving side

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse frames from the decrypted byte stream. Payloads are handed out without copying: a chunk
        that is all payload is passed on as the very object received."""
        events: list[Event] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._payload_left:
                take = min(self._payload_left, end - pos)
                chunk = data if take == end else memoryview(data)[pos : pos + take]
                self._payload_left -= take
                pos += take
                if self._payload_stream is not None:
                    events.append(DataReceived(self._payload_stream, chunk))
                if not self._payload_left:
                    self._end_payload(events)
                continue
            if self._header_buf or end - pos < HEADER_LENGTH:
                take = min(HEADER_LENGTH - len(self._header_buf), end - pos)
                self._header_buf += data[pos : pos + take]
                pos += take
                if len(self._header_buf) < HEADER_LENGTH:
                    break
                header: bytes | bytearray = self._header_buf
                offset = 0
                self._header_buf = bytearray()
            else:
                header, offset = data, pos
                pos += HEADER_LENGTH
            version, kind, flags, stream_id, length = HEADER.unpack_from(header, offset)
            if version != VERSION:
                raise ProtocolError(f"yamux frame has version {version}, expected {VERSION}")
            if kind > TYPE_GO_AWAY:
                raise ProtocolError(f"yamux frame has unknown type {kind}")
            self._on_header(kind, flags, stream_id, length, events)
        if len(self._out) > MAX_PENDING_CONTROL_FRAMES:
            raise ProtocolError(f"peer provoked more than {MAX_PENDING_CONTROL_FRAMES} unsent control frames")
        return events

    def _on_header(self, kind: int, flags: int, stream_id: int, length: int, events: list[Event]) -> None:
        if kind == TYPE_PING:
            if flags & FLAG_SYN:
                self._out.append(HEADER.pack(VERSION, TYPE_PING, FLAG_ACK, 0, length))
            elif flags & FLAG_ACK:
                events.append(PongReceived(length))
            return
        if kind == TYPE_GO_AWAY:
            self.go_away_received = True
            events.append(GoAwayReceived(length))
            return
        if stream_id == 0:
            raise ProtocolError("yamux stream frame uses the session id 0")
        state = self._streams.get(stream_id)
        if flags & FLAG_SYN:
            state = self._accept(stream_id, state, events)
        if kind == TYPE_DATA:
            # Checked here, before any payload byte is buffered: a peer cannot make us hold more than
            # the window we granted.
            if state is None:
                if length > self._window:  # we grant no stream more than the configured maximum
                    raise ProtocolError(f"yamux DATA frame of {length} bytes exceeds any window we grant")
            elif length > state.recv_window:
                raise ProtocolError(
                    f"yamux peer sent {length} bytes on stream {stream_id} with only {state.recv_window} "
                    "granted: it ignores flow control"
                )
            elif length and state.remote_closed:
                raise ProtocolError(f"yamux peer sent data on stream {stream_id} after closing it")
        if state is None:
            # A frame for a stream we refused or already forgot (reset, fully closed): the peer may not
            # have seen our RST yet. Skip it; we buffer nothing for it.
            if kind == TYPE_DATA and length:
                self._payload_left, self._payload_stream, self._payload_flags = length, None, 0
            return
        if flags & FLAG_RST:
            del self._streams[stream_id]
            events.append(StreamReset(stream_id))
            if kind == TYPE_DATA and length:
                self._payload_left, self._payload_stream, self._payload_flags = length, None, 0
            return
        if kind == TYPE_WINDOW_UPDATE:
            if state.send_window + length > 0xFFFFFFFF:
                raise ProtocolError(f"yamux window update overflows stream {stream_id}'s window")
            state.send_window += length
            if length:
                events.append(WindowUpdated(stream_id))
        elif length:
            state.recv_window -= length
            self._payload_left, self._payload_stream, self._payload_flags = length, stream_id, flags
            return  # a FIN on this frame applies once its payload is through
        self._apply_fin(stream_id, state, flags, events)

    def _end_payload(self, events: list[Event]) -> None:
        stream_id = self._payload_stream
        if stream_id is None:
            return
        state = self._streams.get(stream_id)
        if state is not None:
            self._apply_fin(stream_id, state, self._payload_flags, events)

    def _apply_fin(self, stream_id: int, state: _StreamState, flags: int, events: list[Event]) -> None:
        if flags & FLAG_FIN and not state.remote_closed:
            state.remote_closed = True
            events.append(StreamEnded(stream_id))
            self._maybe_forget(stream_id, state)

    def _accept(self, stream_id: int, state: _StreamState | None, events: list[Event]) -> _StreamState | None:
        if state is not None:
            raise ProtocolError(f"yamux SYN for stream {stream_id}, which is already open")
        if (stream_id % 2 == 1) == self.is_client:
            raise ProtocolError(f"yamux peer opened stream {stream_id} with our parity")
        if self.go_away_sent or len(self._streams) >= self._max_streams:
            self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))
            return None
        state = _StreamState()
        self._streams[stream_id] = state
        self._out.append(HEADER.pack(VERSION, TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, 0))
        events.append(StreamOpened(stream_id))
        return state

    # ------------------------------------------------------------------ helpers

    def _live(self, stream_id: int) -> _StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            raise StreamResetError(f"stream {stream_id} is reset or closed")
        return state

    def _maybe_forget(self, stream_id: int, state: _StreamState) -> None:
        if state.local_closed and state.remote_closed:
            del self._streams[stream_id]
