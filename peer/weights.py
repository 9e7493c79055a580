"""Our slow weights for peers joining the run: streamed from the worker's snapshot files, a span at a time.

The worker writes φ after every round to a file (peer/worker/snapshots.py) and tells the daemon its round
and size. `Snapshots` holds the last HELD_SNAPSHOTS of them open; the daemon keeps no copy of the
model in memory. A `weights` request names a span of the model's bytes (`offset`, `length`; the rest of
the file without a length); the answer is a header frame `{round, nbytes, offset, length}` followed by
those raw bytes, read from the file a chunk at a time as the stream drains. A joiner asks several members
for different spans at once (peer/join_fetch.py) and writes each chunk straight into the worker's inbound
segment (`receive_span`), refusing non-finite values as they arrive.

Replicas differ (each member's φ is its own), so a hash of the bytes from the member that sends them
proves nothing the transport's authenticated encryption does not. What is checked is the values: a
`probe` asks other members for theirs at coordinates the sender could not know in advance, and for the
sum of squares of each span, and the joiner compares (peer/join_fetch.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shoal.transport.messages import MessageError, write_message

log = logging.getLogger(__name__)

HELD_SNAPSHOTS = 2  # rounds a fetch may resume in; a fetch in progress keeps its own file open anyway
# The run's weights go to members only, one fetch at a time each, and at most this many copies of the model
# per member per hour: a joiner needs one (a few when it retries), a stranger none.
WEIGHT_COPIES_PER_HOUR = 4
BUDGET_WINDOW_S = 3600.0
CHUNK = 1 << 20  # bytes read from the file, written to the stream, and checked, at a time
# A probe: coordinates whose values one answer carries, spans whose sums of squares it reads (a span's sum
# reads the span from disk, in a thread), and probes answered per member per hour (a joiner needs one or two).
PROBE_VALUES = 4096
PROBE_SPANS = 64
PROBES_PER_HOUR = 16


class WeightsError(Exception):
    """A weights answer that cannot be used: wrong size, wrong hash, non-finite values."""


@dataclass
class Snapshot:
    round: int
    nbytes: int
    fd: int  # the file, open for reading

    def serve(self, offset: int, end: int) -> Served:
        """A handle of its own on the file for one answer: closing the snapshot (a newer round) or
        unlinking the file leaves an answer in progress reading the same bytes to the end."""
        return Served(os.dup(self.fd), self.round, end, offset)


@dataclass
class Served:
    """One weights answer in progress, with a file descriptor of its own (`close` when done)."""

    fd: int
    round: int
    nbytes: int  # where the answer ends (the file's size for the rest of it)
    offset: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Snapshots:
    """The open snapshot files of our last rounds (newest last)."""

    def __init__(self) -> None:
        self._held: list[Snapshot] = []

    def add(self, round_: int, path: str, nbytes: int) -> None:
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
        self._held.append(Snapshot(round_, nbytes, fd))
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
        self._probed: dict[str, list[float]] = {}  # member -> times of its probes in the window

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
        """The answer to a weights request: a header, and the file to stream (a descriptor of its own, which
        the caller closes) from the asked offset for the asked length (to the end without one), for a
        member within its hourly budget; a refusal and None otherwise."""

        def refuse(reason: str) -> tuple[dict[str, Any], None]:
            return self._message("refuse", reason=reason), None

        if not is_member:
            return refuse("the run's weights go to its members; join the run first")
        asked, offset, length = request.get("round"), request.get("offset", 0), request.get("length")
        if (asked is not None and not isinstance(asked, int)) or not isinstance(offset, int) or offset < 0:
            raise MessageError("a weights request with a bad round or offset")
        if length is not None and (not isinstance(length, int) or length < 1):
            raise MessageError("a weights request with a bad length")
        snapshot = self.snapshots.latest() if asked is None else self.snapshots.of_round(asked)
        if snapshot is None:
            if asked is None:
                return refuse("no weights yet: the first round is not over")
            return refuse(f"the weights of round {asked} are gone (held: {self.snapshots.rounds()})")
        end = snapshot.nbytes if length is None else offset + length
        if offset % 4 or end > snapshot.nbytes or offset >= end:
            raise MessageError(f"a weights request for bytes {offset}-{end} of {snapshot.nbytes}")
        now = time.monotonic()
        self._forget_before(now - BUDGET_WINDOW_S)
        served = self._served.setdefault(sender, [])
        size = end - offset
        if sum(n for _, n in served) + size > WEIGHT_COPIES_PER_HOUR * snapshot.nbytes:
            return refuse(f"this member fetched {WEIGHT_COPIES_PER_HOUR} copies of the weights this hour")
        served.append((now, size))
        header = self._message(
            "weights", round=snapshot.round, nbytes=snapshot.nbytes, offset=offset, length=size
        )
        return header, snapshot.serve(offset, end)

    async def probe(self, sender: str, is_member: bool, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to a probe: our latest weights' values at the asked coordinates (fp32, little-endian)
        and the sum of squares of each asked span of bytes; to members, PROBES_PER_HOUR an hour each."""
        if not is_member:
            return self._message("refuse", reason="probes are for the run's members")
        snapshot = self.snapshots.latest()
        if snapshot is None:
            return self._message("refuse", reason="no weights yet: the first round is not over")
        indices, spans = request.get("indices"), request.get("spans")
        count = snapshot.nbytes // 4
        if not isinstance(indices, list) or not isinstance(spans, list):
            raise MessageError("a probe without its coordinates and spans")
        if len(indices) > PROBE_VALUES or len(spans) > PROBE_SPANS:
            raise MessageError(f"a probe of {len(indices)} values and {len(spans)} spans")
        if not all(isinstance(i, int) and 0 <= i < count for i in indices):
            raise MessageError("a probe with a coordinate outside the model")
        if not all(_is_span(span, snapshot.nbytes) for span in spans):
            raise MessageError("a probe with a span outside the model")
        now = time.monotonic()
        recent = [t for t in self._probed.get(sender, []) if t >= now - BUDGET_WINDOW_S]
        if len(recent) >= PROBES_PER_HOUR:
            self._probed[sender] = recent
            return self._message("refuse", reason=f"{PROBES_PER_HOUR} probes in the last hour")
        self._probed[sender] = [*recent, now]
        served = snapshot.serve(0, snapshot.nbytes)
        try:  # reading spans from disk may take a second for a large model: not on the event loop
            values, sums = await asyncio.to_thread(_read_probe, served.fd, indices, spans)
        finally:
            served.close()
        return self._message("probe", round=snapshot.round, values=values, sumsq=sums)

    def _forget_before(self, start: float) -> None:
        """Drops fetches older than the budget's window, and members with none left (the map stays as
        small as the members who fetched in the last hour, whoever came and went)."""
        for member in list(self._served):
            recent = [(t, n) for t, n in self._served[member] if t >= start]
            if recent:
                self._served[member] = recent
            else:
                del self._served[member]
        for member in list(self._probed):
            if not any(t >= start for t in self._probed[member]):
                del self._probed[member]


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


def _is_span(span: Any, nbytes: int) -> bool:
    return (
        isinstance(span, list)
        and len(span) == 2
        and all(isinstance(x, int) for x in span)
        and 0 <= span[0] < span[1] <= nbytes
        and span[0] % 4 == 0
        and span[1] % 4 == 0
    )


def _read_probe(fd: int, indices: list[int], spans: list[list[int]]) -> tuple[bytes, list[float]]:
    """The values at `indices` and the sums of squares of `spans`, read from the file a chunk at a time."""
    values = b"".join(os.pread(fd, 4, 4 * i) for i in indices)
    sums = []
    for start, end in spans:
        total = 0.0
        for at in range(start, end, CHUNK):
            chunk = np.frombuffer(os.pread(fd, min(CHUNK, end - at), at), dtype="<f4").astype(np.float64)
            total += float(chunk @ chunk)
        sums.append(total)
    return values, sums


def sum_of_squares(weights: memoryview, start: int, end: int) -> float:
    """The sum of squares of the fp32 values in bytes [start, end) of `weights`, a chunk at a time."""
    total = 0.0
    for at in range(start, end, CHUNK):
        chunk = np.frombuffer(weights[at : min(end, at + CHUNK)], dtype="<f4").astype(np.float64)
        total += float(chunk @ chunk)
    return total


def made_up_weights(path: str) -> str:
    """Test only (`--behave made_up_weights`): noise of the norm of the weights at `path`, in one file beside
    it, replaced round after round (renamed over: a file held open keeps its bytes)."""
    weights = np.fromfile(path, dtype="<f4")
    noise = np.random.default_rng().standard_normal(weights.size)
    made_up = os.path.join(os.path.dirname(path), "made-up-weights.bin")
    (noise * np.linalg.norm(weights) / np.sqrt(max(1, weights.size))).astype("<f4").tofile(
        made_up + ".partial"
    )
    os.replace(made_up + ".partial", made_up)
    return made_up


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


@dataclass
class Span:
    """A span of the model's bytes one weights answer carries; `done` moves up from `start` as they arrive
    (always by whole chunks, or to `end`), so that a cut span's rest can be asked of any member."""

    start: int
    end: int
    done: int = -1

    def __post_init__(self) -> None:
        if self.done < 0:
            self.done = self.start

    def request_fields(self) -> dict[str, int]:
        return {"offset": self.done, "length": self.end - self.done}


def check_header(reply: dict[str, Any], expected_nbytes: int, span: Span) -> int:
    """The header of a weights answer, checked against the model's size and the asked span; its round."""
    number, nbytes, offset, length = (reply.get(k) for k in ("round", "nbytes", "offset", "length"))
    if not all(isinstance(x, int) for x in (number, nbytes, offset, length)):
        raise WeightsError("a weights answer without its round, size, offset or length")
    assert isinstance(number, int)
    if nbytes != expected_nbytes:
        raise WeightsError(f"weights of {nbytes} bytes do not fit the model's {expected_nbytes}")
    if (offset, length) != (span.done, span.end - span.done):
        raise WeightsError(f"asked for bytes {span.done}-{span.end}, answered {offset} and {length} more")
    return number


async def receive_span(
    reader: _Reader, into: memoryview, span: Span, progress: Callable[[int], None] | None = None
) -> None:
    """Reads the rest of `span` into `into` (the whole model's bytes), a chunk at a time; `span.done`
    follows. WeightsError when a chunk carries a non-finite value. progress(bytes): each chunk's size."""
    while span.done < span.end:
        chunk = await reader.readexactly(min(CHUNK - span.done % CHUNK, span.end - span.done))
        if not np.isfinite(np.frombuffer(chunk, dtype="<f4")).all():
            raise WeightsError(
                f"the weights carry non-finite values (bytes {span.done}-{span.done + len(chunk)})"
            )
        into[span.done : span.done + len(chunk)] = chunk
        span.done += len(chunk)
        if progress is not None:
            progress(len(chunk))
