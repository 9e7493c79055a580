"""A round payload on the wire, streamed: the offer's header frame, then the payload's raw bytes.

Neither side holds the payload whole. The sender writes it from the worker's outbound segment a chunk at a
time, under the stream's flow control, while it already listens for the answer: a partner that refuses the
offer (it moved on, the payload is invalid) stops the upload at once. The receiver reads it into the worker's
inbound segment a chunk at a time, only once it has decided to take it (its own round is ready), and only
while that round is still open: a transfer that outlives its round never writes into the segment the next
round's payload may be in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from shoal.transport.errors import TransportError

CHUNK = 1 << 20  # bytes per write and per read: the memory one transfer holds besides the stream's window

T = TypeVar("T")


class RoundClosed(Exception):
    """The round a payload was arriving for ended (its deadline, a stop) before the payload was in."""


class _Sink(Protocol):
    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


class _Source(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


async def send_body(stream: _Sink, body: memoryview) -> int:
    """Writes `body` a chunk at a time (each write waits for the peer's window), then half-closes."""
    for start in range(0, len(body), CHUNK):
        await stream.write(body[start : start + CHUNK])
    await stream.close()
    return len(body)


async def send_while_answered(stream: _Sink, body: memoryview, answer: Awaitable[T]) -> tuple[T, int]:
    """Sends `body` while awaiting `answer` (a reader of the peer's reply): (the reply, the body's bytes
    sent). A reply that comes before the whole body went out (a refusal) ends the upload, and the stream is
    reset: the rest is never sent. What either side raises is raised here; nothing is left running."""
    sending = asyncio.ensure_future(send_body(stream, body))
    replying = asyncio.ensure_future(answer)
    try:
        done, _ = await asyncio.wait({sending, replying}, return_when=asyncio.FIRST_COMPLETED)
        if replying not in done:
            try:
                sent = sending.result()  # the body went out, or this raises why not
            except TransportError:  # the peer reset the stream: its answer (a refusal) may be in before it
                return await replying, 0
            return await replying, sent
        reply = replying.result()
        if sending.done() and not sending.cancelled() and sending.exception() is None:
            return reply, sending.result()
        await stream.reset()  # answered before the whole body went out (a refusal): the rest is never sent
        return reply, 0
    finally:
        for task in (sending, replying):
            task.cancel()
        await asyncio.gather(sending, replying, return_exceptions=True)


async def receive_body(
    source: _Source,
    into: memoryview,
    still_open: Callable[[], bool],
    progress: Callable[[int, int], Any] | None = None,
) -> None:
    """Reads exactly len(`into`) bytes into `into`, a chunk at a time. Before each chunk lands,
    `still_open()` must hold (the round is still being swapped), else RoundClosed: the check and the copy
    run with no await between them, so nothing is written once the round is over.
    asyncio.IncompleteReadError if the stream ends first."""
    nbytes, done = len(into), 0
    while done < nbytes:
        chunk = await source.read(min(CHUNK, nbytes - done))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", nbytes - done)
        if not still_open():
            raise RoundClosed
        into[done : done + len(chunk)] = chunk
        done += len(chunk)
        if progress is not None:
            progress(done, nbytes)
