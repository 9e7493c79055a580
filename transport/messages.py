"""Length-prefixed msgpack messages with limits: the framing of Shoal's own protocols.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map. The length is
checked against the receiver's limit before a single byte of the body is read, so a hostile peer
cannot make us allocate more than we agreed to. Tensor bytes travel as msgpack `bin`, never pickled.

`FrameDecoder` is the sans-I/O core (bytes in, messages out); `read_message` / `write_message` drive it
over anything with asyncio-stream-like `readexactly` and `write` (asyncio streams or transport streams).
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from shoal.errors import ShoalError

LENGTH_PREFIX = struct.Struct(">I")
# Control messages (membership, status) are small; a frame over 1 MiB on a control protocol is an attack
# or a bug. Protocols that carry tensors pass their own, larger, limit.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
# Bounds on msgpack containers inside one message: enough for a model's tensor list, far below what
# would let a small frame expand into a large allocation.
MAX_CONTAINER_ITEMS = 100_000
MAX_STRING_BYTES = 64 * 1024
# A body read with a progress callback arrives in pieces of this size: small enough that a slow sender's
# pace is measured (peer/deadlines.py) well before a request's first deadline.
PROGRESS_CHUNK = 64 * 1024


class MessageError(ShoalError):
    """A peer sent a frame that is oversized, truncated or not a valid message."""


class _Readable(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


def encode_message(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return LENGTH_PREFIX.pack(len(body)) + body


def decode_body(
    body: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """One msgpack map, unpacked with explicit limits on every container and string."""
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=MAX_STRING_BYTES,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as error:
        raise MessageError(f"undecodable message body ({len(body)} bytes): {error}") from error
    if not isinstance(message, dict):
        raise MessageError(f"a message must be a msgpack map, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Sans-I/O: feed bytes, get whole messages. Refuses any frame longer than `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= LENGTH_PREFIX.size:
            (length,) = LENGTH_PREFIX.unpack_from(self._buffer)
            check_length(length, self.max_bytes)
            end = LENGTH_PREFIX.size + length
            if len(self._buffer) < end:
                break
            messages.append(decode_body(bytes(self._buffer[LENGTH_PREFIX.size : end]), self.max_bytes))
            del self._buffer[:end]
        return messages


def check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise MessageError(f"frame of {length} bytes exceeds the limit of {max_bytes} bytes")


async def read_message(reader: _Readable, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Reads one frame. Raises MessageError on a bad frame, asyncio.IncompleteReadError on early EOF."""
    message, _ = await read_frame(reader, max_bytes)
    return message


async def read_frame(
    reader: _Readable,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """Like read_message, and also returns the frame's size on the wire.

    `progress(done, total)` is called with the body's byte counts: once the length is known (done 0),
    then after each piece; a caller can draw a bar or time the transfer from its first byte."""
    (length,) = LENGTH_PREFIX.unpack(await reader.readexactly(LENGTH_PREFIX.size))
    check_length(length, max_bytes)
    if progress is None:
        body: bytes | bytearray = await reader.readexactly(length)
    else:
        progress(0, length)
        body = bytearray()  # grows to at most `length`, which the limit was checked against
        while len(body) < length:
            body += await reader.readexactly(min(PROGRESS_CHUNK, length - len(body)))
            progress(len(body), length)
    return decode_body(body, max_bytes), LENGTH_PREFIX.size + length


async def write_message(writer: Any, message: dict[str, Any]) -> int:
    """Writes one frame and waits until it may write more; returns the bytes written."""
    frame = encode_message(message)
    result = writer.write(frame)
    if inspect.isawaitable(result):  # transport streams: write() applies backpressure itself
        await result
    else:  # asyncio.StreamWriter
        await writer.drain()
    return len(frame)
