"""multistream-select 1.0, sans-I/O: agree on one protocol id before the bytes of that protocol flow.

Spec: https://github.com/multiformats/multistream-select. Every message is a uvarint length, then UTF-8
text ending in "\\n". Both sides first send the header "/multistream/1.0.0"; the dialer proposes protocol
ids one at a time; the listener echoes the one it accepts or answers "na".

The dialer pipelines its header with its first proposal (saves a round trip, as go-multistream does). A
dialer sure of its one protocol may go further and send the protocol's first bytes before the listener's
echo (lazy negotiation, `Host.new_stream(lazy=True)`): the echo is checked at its first read. Bytes
received after the agreement are kept in `unused_data` for the negotiated protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import NegotiationError, ProtocolError
from .varint import decode_uvarint, encode_uvarint

PROTOCOL_ID = "/multistream/1.0.0"
NA = "na"
LS = "ls"
# go-multistream refuses messages above 1024 bytes; protocol ids are short paths.
MAX_MESSAGE_LENGTH = 1024
# A listener answers at most this many proposals before giving up on a dialer that never finds a match.
MAX_PROPOSALS = 32


def encode_message(text: str) -> bytes:
    body = text.encode() + b"\n"
    if len(body) > MAX_MESSAGE_LENGTH:
        raise ValueError(f"multistream message of {len(body)} bytes exceeds {MAX_MESSAGE_LENGTH}")
    return encode_uvarint(len(body)) + body


class _MessageReader:
    """Splits the incoming byte stream into multistream messages, bounded in size."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def check_unparsed(self) -> None:
        """After parsing what it could: a message is at most MAX_MESSAGE_LENGTH plus its varint, so never
        hold more than a few of them. (Before parsing, a buffer may hold a lazy dialer's first bytes of
        the protocol too: a flow-control window's worth at most.)"""
        if len(self._buffer) > 4 * (MAX_MESSAGE_LENGTH + 2) + 65536:
            raise ProtocolError("peer sent too much data during multistream negotiation")

    def next_message(self) -> str | None:
        decoded = decode_uvarint(self._buffer)
        if decoded is None:
            return None
        length, start = decoded
        if length > MAX_MESSAGE_LENGTH or length == 0:
            raise ProtocolError(f"multistream message length {length} outside 1..{MAX_MESSAGE_LENGTH}")
        if len(self._buffer) < start + length:
            return None
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]
        if not body.endswith(b"\n"):
            raise ProtocolError("multistream message does not end with a newline")
        try:
            return body[:-1].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("multistream message is not UTF-8") from exc

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


class _Negotiation:
    """What both sides share: the header exchange, buffered output, and the bytes after agreement."""

    def __init__(self, first_output: bytes) -> None:
        self._reader = _MessageReader()
        self._out = bytearray(first_output)
        self._header_seen = False
        self.selected: str | None = None
        self.unused_data = b""

    @property
    def done(self) -> bool:
        return self.selected is not None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.done:
            self.unused_data += data
            return
        self._reader.feed(data)
        while not self.done and (message := self._reader.next_message()) is not None:
            if not self._header_seen:
                if message != PROTOCOL_ID:
                    raise NegotiationError(f"peer speaks {message[:64]!r}, not {PROTOCOL_ID}")
                self._header_seen = True
            else:
                self._on_message(message)
        if not self.done:
            self._reader.check_unparsed()

    def _on_message(self, message: str) -> None:
        raise NotImplementedError


class MultistreamDialer(_Negotiation):
    """The initiating side: proposes `protocols` in order until the listener accepts one."""

    def __init__(self, protocols: Sequence[str]) -> None:
        if not protocols:
            raise ValueError("a multistream dialer needs at least one protocol to propose")
        self._proposals = list(protocols)
        super().__init__(encode_message(PROTOCOL_ID) + encode_message(self._proposals[0]))

    def _on_message(self, message: str) -> None:
        if message == self._proposals[0]:
            self.selected = message
            self.unused_data = self._reader.take_rest()
        elif message == NA:
            self._proposals.pop(0)
            if not self._proposals:
                raise NegotiationError("peer supports none of the protocols we proposed")
            self._out += encode_message(self._proposals[0])
        else:
            raise NegotiationError(f"peer answered {message[:64]!r} to our proposal {self._proposals[0]!r}")


class MultistreamListener(_Negotiation):
    """The accepting side: answers proposals with the first one found in `supported`."""

    def __init__(self, supported: Iterable[str]) -> None:
        self._supported = frozenset(supported)
        self._proposals_seen = 0
        super().__init__(encode_message(PROTOCOL_ID))

    def _on_message(self, message: str) -> None:
        self._proposals_seen += 1
        if self._proposals_seen > MAX_PROPOSALS:
            raise NegotiationError(f"peer proposed more than {MAX_PROPOSALS} protocols without a match")
        if message in self._supported:
            self.selected = message
            self._out += encode_message(message)
            self.unused_data = self._reader.take_rest()
        else:
            self._out += encode_message(NA)  # also the answer to "ls": we do not list
