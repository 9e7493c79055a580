"""Daemon <-> worker plumbing: a control channel of framed msgpack, and shared memory for payloads.

The worker owns the model; the daemon owns the network. Control messages (a few hundred bytes) travel
over the worker's stdin/stdout pipes with the same framing as the wire protocols. Payloads (up to the
model's size) never go through a pipe: the worker writes its payload into one shared-memory segment
and reads its partner's from another, and the control message only says how many bytes are there.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import select
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, BinaryIO

from shoal.errors import ShoalError
from shoal.peer import logs
from shoal.transport.messages import (
    LENGTH_PREFIX,
    MessageError,
    check_length,
    decode_body,
    encode_message,
    read_message,
    write_message,
)

MAX_CONTROL_BYTES = 1 << 16  # control messages carry numbers and names only
RELAY_CHUNK = 1 << 16  # bytes of the worker's stderr read at a time (under --log-json)
STDERR_DRAIN_TIMEOUT = 5.0  # seconds to let a stopped worker's last stderr lines through


class WorkerGone(ShoalError):
    """The training worker exited while the daemon still had something to tell it."""


class SharedBuffer:
    """A named shared-memory segment of fixed capacity; the creator unlinks it."""

    def __init__(self, segment: shared_memory.SharedMemory, owner: bool):
        self.segment = segment
        self.owner = owner

    @classmethod
    def create(cls, capacity: int) -> SharedBuffer:
        return cls(shared_memory.SharedMemory(create=True, size=max(capacity, 1)), owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedBuffer:
        segment = shared_memory.SharedMemory(name=name)
        # Python 3.11 registers attached segments with this process's resource tracker, which would
        # unlink the creator's segment when we exit; only the creator may do that.
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(segment, owner=False)

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def capacity(self) -> int:
        return self.segment.size

    @property
    def _buf(self) -> memoryview:
        buf = self.segment.buf  # None once the segment is closed
        assert buf is not None, "shared buffer used after close()"
        return buf

    def write(self, data: bytes | memoryview) -> int:
        if len(data) > self.capacity:
            raise ValueError(f"{len(data)} bytes do not fit the {self.capacity}-byte shared buffer")
        self._buf[: len(data)] = data
        return len(data)

    def view(self, nbytes: int) -> memoryview:
        """The first `nbytes` of the segment, to fill in place (a transfer written as it arrives)."""
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"{nbytes} bytes do not fit the {self.capacity}-byte shared buffer")
        return self._buf[:nbytes]

    def read(self, nbytes: int) -> bytes:
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"{nbytes} bytes are outside the {self.capacity}-byte shared buffer")
        return bytes(self._buf[:nbytes])

    def close(self) -> None:
        # BufferError: a transfer cut by a stop still holds a view of the segment for a moment; its mapping
        # goes when the last view does (or with the process), and the name is unlinked below all the same.
        with contextlib.suppress(BufferError):
            self.segment.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.segment.unlink()


ANSWERS = ("partner", "skip")  # the daemon's answers to a worker's `payload`


class ControlChannel:
    """Blocking framed msgpack over two pipes; the worker's side of the control channel."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO):
        self.reader = reader
        self.writer = writer
        # An overlapped worker trains while its daemon swaps: the swap's answer (`partner` or `skip`) may
        # then arrive between two inner steps, where stops are looked for; it is held here for the worker.
        self.expecting_answer = False
        self.held: dict[str, Any] | None = None
        self._stop_seen = False

    @classmethod
    def from_stdio(cls) -> ControlChannel:
        """Takes over stdin/stdout for the protocol and points fd 1 at stderr, so that a stray print()
        from any library cannot corrupt a frame."""
        protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        return cls(os.fdopen(os.dup(0), "rb", buffering=0), protocol_out)

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(encode_message(message))

    def receive(self) -> dict[str, Any] | None:
        """The next message (an answer held by `stop_requested` first), or None when the daemon closed the
        channel."""
        if self.held is not None:
            held, self.held = self.held, None
            return held
        return self._read()

    def _read(self) -> dict[str, Any] | None:
        prefix = self._read_exactly(LENGTH_PREFIX.size)
        if prefix is None:
            return None
        (length,) = LENGTH_PREFIX.unpack(prefix)
        check_length(length, MAX_CONTROL_BYTES)
        body = self._read_exactly(length)
        if body is None:
            raise MessageError("control channel closed in the middle of a message")
        return decode_body(body, MAX_CONTROL_BYTES)

    def stop_requested(self) -> bool:
        """Between inner steps: has the daemon asked us to stop, or gone? Never blocks. While the worker
        trains, the daemon sends nothing but `stop` and, when `expecting_answer` (an overlapped round is
        being swapped), that round's answer, held for `receive`; anything else breaks the protocol."""
        if self._stop_seen:
            return True
        readable, _, _ = select.select([self.reader], [], [], 0)
        if not readable:
            return False
        message = self._read()
        if message is not None and message.get("type") in ANSWERS and self.expecting_answer:
            self.held, self.expecting_answer = message, False
            return False
        if message is not None and message.get("type") != "stop":
            raise MessageError(f"the daemon sent {message.get('type')!r} while the worker was training")
        self._stop_seen = True
        return True

    def answer_ready(self) -> bool:
        """An overlapped worker between inner steps: is the swap's answer here? Never blocks; a stop read
        meanwhile is kept (`stop_requested` says so next)."""
        if self.held is None and self.expecting_answer:
            self.stop_requested()
        return self.held is not None

    def _read_exactly(self, n: int) -> bytes | None:
        chunks, remaining = [], n
        while remaining:
            chunk = self.reader.read(remaining)
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class WorkerProcess:
    """The daemon's handle on its training worker: a subprocess running `python -P -m shoal.peer.worker`."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.outbound: SharedBuffer | None = None  # the worker writes its payloads here
        self.inbound: SharedBuffer | None = None  # we write the partner's payload here
        self._stderr_relay: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls) -> WorkerProcess:
        """Starts the worker. Under --log-json its stderr comes through us, each line made a JSON object."""
        relay = logs.json_mode()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "shoal.peer.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if relay else None,
        )
        worker = cls(process)
        if relay and process.stderr is not None:
            target = sys.stderr.target if isinstance(sys.stderr, logs.JsonLines) else sys.stderr
            out = logs.JsonLines(target, "shoal.peer.worker")
            worker._stderr_relay = asyncio.create_task(_relay_stderr(process.stderr, out))
        return worker

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            await write_message(self.process.stdin, message)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerGone(f"the training worker is gone (exit code {self.process.returncode})") from error

    async def receive(self) -> dict[str, Any] | None:
        """The worker's next message, or None when it exited or closed its side."""
        assert self.process.stdout is not None
        try:
            return await read_message(self.process.stdout, MAX_CONTROL_BYTES)
        except asyncio.IncompleteReadError:
            return None

    def attach(self, hello: dict[str, Any]) -> None:
        self.outbound = SharedBuffer.attach(hello["outbound"])
        self.inbound = SharedBuffer.attach(hello["inbound"])

    async def stop(self, grace: float = 10.0) -> int:
        """Closes the control channel (the worker saves and exits), then waits; kills it past `grace`."""
        for buffer in (self.outbound, self.inbound):
            if buffer is not None:
                buffer.close()
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(grace):
                code = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._stderr_relay is not None:  # the worker's last lines (a traceback, say) still go out
            await asyncio.wait({self._stderr_relay}, timeout=STDERR_DRAIN_TIMEOUT)
            self._stderr_relay.cancel()
        return code


async def _relay_stderr(reader: asyncio.StreamReader, out: logs.JsonLines) -> None:
    """Copies the worker's stderr to ours through `out` (JSON objects only), until the worker closes it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := await reader.read(RELAY_CHUNK):
            out.write(decoder.decode(chunk))
        out.write(decoder.decode(b"", final=True))
    except (OSError, ValueError):  # our own stderr is gone (closed at exit): nowhere left to write
        return
    out.close()
