"""Our slow weights for peers joining the run: streamed from the worker's snapshot files, in chunks.

The worker writes φ after every round to a file (peer/worker/snapshots.py) and tells the daemon its round,
size and SHA-256. `Snapshots` holds the last HELD_SNAPSHOTS of them open; the daemon keeps no copy of the
model in memory. A `weights` answer is a header frame `{round, nbytes, sha256, offset}` followed by the raw
bytes from `offset` to the end, read from the file a chunk at a time as the stream drains. A request may
name a round and an offset: a joiner whose fetch was cut resumes where it stopped, from the same round's
file while this peer still holds it. The joiner writes each chunk straight into the worker's inbound
segment (`receive_into`), hashing as it goes, and accepts the weights only when the hash matches the
header's and every value is finite.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shoal.transport.errors import TransportError
from shoal.transport.messages import MessageError, write_message

log = logging.getLogger(__name__)

HELD_SNAPSHOTS = 2  # rounds a fetch may resume in; a fetch in progress keeps its own file open anyway
# The run's weights go to members only, one fetch at a time each, and at most this many copies of the model
# per member per hour: a joiner needs one (a few when it retries), a stranger none.
WEIGHT_COPIES_PER_HOUR = 4
BUDGET_WINDOW_S = 3600.0
CHUNK = 1 << 20  # bytes read from the file, written to the stream, and checked, at a time


class WeightsError(Exception):
    """A weights answer that cannot be used: wrong size, wrong hash, non-finite values."""


@dataclass
class Snapshot:
    round: int
    nbytes: int
    sha256: str  # hex
    fd: int  # the file, open for reading

    def serve(self, offset: int) -> Served:
        """A handle of its own on the file for one answer: closing the snapshot (a newer round) or
        unlinking the file leaves an answer in progress reading the same bytes to the end."""
        return Served(os.dup(self.fd), self.round, self.nbytes, offset)


@dataclass
class Served:
    """One weights answer in progress, with a file descriptor of its own (`close` when done)."""

    fd: int
    round: int
    nbytes: int
    offset: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Snapshots:
    """The open snapshot files of our last rounds (newest last)."""

    def __init__(self) -> None:
        self._held: list[Snapshot] = []

    def add(self, round_: int, path: str, nbytes: int, sha256: str) -> None:
        """Opens the worker's file of round `round_` (an absent or short file is logged and skipped)."""
        try:
            fd = os.open(path, os.O_RDONLY)  # held open until newer rounds replace it
        except OSError as error:
            log.warning("the worker's weights of round %d cannot be opened: %s", round_, error)
            return
        if os.fstat(fd).st_size != nbytes:
            log.warning("the worker's weights of round %d are not %d bytes: not served", round_, nbytes)
            os.close(fd)
            return
        self._held.append(Snapshot(round_, nbytes, sha256, fd))
        while len(self._held) > HELD_SNAPSHOTS:
            os.close(self._held.pop(0).fd)

    def latest(self) -> Snapshot | None:
        return self._held[-1] if self._held else None

    def of_round(self, round_: int) -> Snapshot | None:
        return next((s for s in self._held if s.round == round_), None)

    def rounds(self) -> list[int]:
        return [s.round for s in self._held]

    def close(self) -> None:
        for snapshot in self._held:
            os.close(snapshot.fd)
        self._held.clear()


class _Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


class WeightsServer:
    """Answers `weights` requests from the snapshot files: to members only, one fetch at a time per member,
    at most WEIGHT_COPIES_PER_HOUR copies of the model's bytes per member per hour.

    message(kind, **fields): a run-protocol message from us."""

    def __init__(self, snapshots: Snapshots, message: Callable[..., dict[str, Any]]) -> None:
        self.snapshots = snapshots
        self._message = message
        self._served: dict[str, list[tuple[float, int]]] = {}  # member -> (time, bytes) in the window
        self._fetching: set[str] = set()  # members whose fetch is being answered

    async def serve(self, sender: str, is_member: bool, request: dict[str, Any], writer: Any) -> None:
        """Writes the answer: a header, then the bytes from the asked offset, or a refusal. MessageError
        for a malformed request, or a second one from a member whose first is still being answered."""
        if sender in self._fetching:
            raise MessageError("a second weights request while the first is being answered")
        self._fetching.add(sender)
        try:
            header, served = self.answer(sender, is_member, request)
            try:
                await write_message(writer, header)
                if served is not None:
                    await send_from(writer, served)
            finally:
                if served is not None:
                    served.close()
        finally:
            self._fetching.discard(sender)

    def answer(
        self, sender: str, is_member: bool, request: dict[str, Any]
    ) -> tuple[dict[str, Any], Served | None]:
        """The answer to a weights request: a header, and the file to stream from the asked offset (a
        descriptor of its own, which the caller closes), for a member within its hourly budget; a refusal
        and None otherwise."""

        def refuse(reason: str) -> tuple[dict[str, Any], None]:
            return self._message("refuse", reason=reason), None

        if not is_member:
            return refuse("the run's weights go to its members; join the run first")
        asked, offset = request.get("round"), request.get("offset", 0)
        if (asked is not None and not isinstance(asked, int)) or not isinstance(offset, int) or offset < 0:
            raise MessageError("a weights request with a bad round or offset")
        snapshot = self.snapshots.latest() if asked is None else self.snapshots.of_round(asked)
        if snapshot is None:
            if asked is None:
                return refuse("no weights yet: the first round is not over")
            return refuse(f"the weights of round {asked} are gone (held: {self.snapshots.rounds()})")
        if offset > snapshot.nbytes or (asked is None and offset):
            raise MessageError(f"a weights request from byte {offset} of {snapshot.nbytes}")
        now = time.monotonic()
        self._forget_before(now - BUDGET_WINDOW_S)
        served = self._served.setdefault(sender, [])
        size = snapshot.nbytes - offset
        if sum(n for _, n in served) + size > WEIGHT_COPIES_PER_HOUR * snapshot.nbytes:
            return refuse(f"this member fetched the weights {len(served)} times in the last hour")
        served.append((now, size))
        header = self._message(
            "weights", round=snapshot.round, nbytes=snapshot.nbytes, sha256=snapshot.sha256, offset=offset
        )
        return header, snapshot.serve(offset)

    def _forget_before(self, start: float) -> None:
        """Drops fetches older than the budget's window, and members with none left (the map stays as
        small as the members who fetched in the last hour, whoever came and went)."""
        for member in list(self._served):
            recent = [(t, n) for t, n in self._served[member] if t >= start]
            if recent:
                self._served[member] = recent
            else:
                del self._served[member]


async def send_from(writer: _Writer, served: Served) -> int:
    """Writes the file's bytes from the answer's offset to the stream, a chunk at a time; returns the bytes
    sent. The stream's write applies backpressure, so at most a chunk (and the stream's window) is in
    memory."""
    position = served.offset
    while position < served.nbytes:
        chunk = os.pread(served.fd, min(CHUNK, served.nbytes - position), position)
        if not chunk:
            raise OSError(f"the weights file of round {served.round} ended at byte {position}")
        await writer.write(chunk)
        position += len(chunk)
    return position - served.offset


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


@dataclass
class Partial:
    """A fetch in progress from one member: enough to resume it after a cut."""

    round: int
    nbytes: int
    sha256: str
    done: int  # bytes received and hashed, from the start
    hasher: Any  # hashlib's running SHA-256 over the first `done` bytes


@dataclass
class Fetch:
    """One joiner's fetch from one member, across the attempts that resume it."""

    partial: Partial | None = None  # set once a header arrived; its `done` grows as bytes arrive
    received: int = 0  # bytes off the wire, headers included, over all attempts

    @property
    def done(self) -> int:
        return 0 if self.partial is None else self.partial.done

    def request_fields(self) -> dict[str, int]:
        """What a weights request asks: the newest weights, or the rest of those it began to receive."""
        if self.partial is None:
            return {}
        return {"round": self.partial.round, "offset": self.partial.done}


async def fetch_resuming(
    attempt: Callable[[Fetch], Awaitable[Any]],
    nbytes: int,
    resumes: int,
    on_resume: Callable[[Fetch, BaseException], None] | None = None,
) -> Fetch:
    """Runs `attempt(fetch)` until the weights are in, resuming after a cut (a connection lost, a deadline
    passed) that brought new bytes, at most `resumes` times; raises the error that ended it otherwise. A bad
    answer (a refusal, a wrong header, a bad hash) is never resumed: the caller asks another member."""
    fetch = Fetch()
    for tries in range(1 + resumes):
        before = fetch.done
        try:
            await attempt(fetch)
            return fetch
        except (OSError, TimeoutError, asyncio.IncompleteReadError, TransportError) as error:
            if tries == resumes or fetch.partial is None or not before < fetch.done < nbytes:
                raise
            if on_resume is not None:
                on_resume(fetch, error)
    raise AssertionError("unreachable: the last try returns or raises")


def check_header(reply: dict[str, Any], expected_nbytes: int, resuming: Partial | None) -> Partial:
    """The header of a weights answer, checked against the model's size (and the fetch it resumes)."""
    number, nbytes, sha256, offset = (reply.get(k) for k in ("round", "nbytes", "sha256", "offset"))
    if not isinstance(number, int) or not isinstance(nbytes, int) or not isinstance(offset, int):
        raise WeightsError("a weights answer without its round, size or offset")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise WeightsError("a weights answer without its SHA-256")
    if nbytes != expected_nbytes:
        raise WeightsError(f"weights of {nbytes} bytes do not fit the model's {expected_nbytes}")
    if resuming is None:
        if offset != 0:
            raise WeightsError(f"a fresh fetch answered from byte {offset}")
        return Partial(number, nbytes, sha256, 0, hashlib.sha256())
    if (number, sha256, offset) != (resuming.round, resuming.sha256, resuming.done):
        raise WeightsError(f"a resumed fetch answered with round {number} from byte {offset}")
    return resuming


async def receive_into(
    reader: _Reader, into: memoryview, partial: Partial, progress: Callable[[int, int], None] | None = None
) -> None:
    """Reads the rest of the weights into `into` (the whole model's bytes), hashing as they arrive;
    `partial.done` follows, so that a cut fetch can be resumed. WeightsError: a bad hash or bad values."""
    while partial.done < partial.nbytes:
        chunk = await reader.readexactly(min(CHUNK, partial.nbytes - partial.done))
        into[partial.done : partial.done + len(chunk)] = chunk
        partial.hasher.update(chunk)
        partial.done += len(chunk)
        if progress is not None:
            progress(partial.done, partial.nbytes)
    if partial.hasher.hexdigest() != partial.sha256:
        raise WeightsError("the weights do not match their SHA-256")
    for start in range(0, partial.nbytes, CHUNK):  # a chunk at a time: no model-sized temporary
        if not np.isfinite(np.frombuffer(into[start : start + CHUNK], dtype="<f4")).all():
            raise WeightsError("the weights carry non-finite values")
