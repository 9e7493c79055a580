"""Weights for joining peers (peer/weights.py, peer/worker/snapshots.py): streamed from the worker's snapshot
files over real sockets, resumed after a cut without resending what arrived, checked by hash and values."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from shoal.peer.weights import (
    BUDGET_WINDOW_S,
    CHUNK,
    WEIGHT_COPIES_PER_HOUR,
    Fetch,
    Snapshots,
    WeightsError,
    WeightsServer,
    check_header,
    fetch_resuming,
    receive_into,
    send_from,
)
from shoal.peer.worker.snapshots import KEEP_SNAPSHOTS, snapshot_path, write_snapshot
from shoal.transport.messages import MessageError, read_frame, read_message, write_message

NBYTES = 3 * CHUNK + 4 * 1000  # a few chunks and a short last one


def weights(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(NBYTES // 4).astype("<f4").tobytes()


def publish(snapshots: Snapshots, directory: Path, round_: int, data: bytes) -> None:
    """What the worker and its daemon do after a round: the file written, then held open."""
    path, nbytes, sha256 = write_snapshot(directory, round_, [data])
    snapshots.add(round_, str(path), nbytes, sha256)


class AsyncWriter:
    """An asyncio StreamWriter with the transport streams' awaitable write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.sent = 0

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)


async def serve(snapshots: Snapshots, cut_after: list[int]):
    """A server answering weights requests from `snapshots`; the n-th answer is cut (the connection
    dropped) after cut_after[n] bytes of weights, when given. Returns the server and the bytes it sent."""
    sent: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_message(reader)
        asked, offset = request.get("round"), request.get("offset", 0)
        snapshot = snapshots.latest() if asked is None else snapshots.of_round(asked)
        if snapshot is None:
            await write_message(writer, {"type": "refuse", "reason": "gone"})
            writer.close()
            return
        header = {"type": "weights", "round": snapshot.round, "nbytes": snapshot.nbytes}
        await write_message(writer, {**header, "sha256": snapshot.sha256, "offset": offset})
        served = snapshot.serve(offset)
        out = AsyncWriter(writer)
        cut = cut_after[len(sent)] if len(sent) < len(cut_after) else None
        try:
            if cut is None:
                await send_from(out, served)
            else:
                served.nbytes = offset + cut  # stop there, then end the connection
                await send_from(out, served)
        finally:
            served.close()
            sent.append(out.sent)
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, sent


async def request_weights(port: int, into: memoryview, fetch: Fetch) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await write_message(writer, {"type": "weights", **fetch.request_fields()})
        reply, size = await read_frame(reader, 1 << 16)
        fetch.received += size
        if reply["type"] != "weights":
            raise WeightsError(f"refused: {reply['reason']}")
        fetch.partial = check_header(reply, len(into), fetch.partial)
        before = fetch.partial.done
        try:
            await receive_into(reader, into, fetch.partial)
        finally:
            fetch.received += fetch.partial.done - before
    finally:
        writer.close()


def test_a_cut_fetch_resumes_where_it_stopped_and_gets_exactly_the_served_round(tmp_path: Path):
    async def main() -> None:
        snapshots = Snapshots()
        data = weights(1)
        publish(snapshots, tmp_path, 7, data)
        server, sent = await serve(snapshots, cut_after=[CHUNK + 123, CHUNK])
        port = server.sockets[0].getsockname()[1]
        into = memoryview(bytearray(NBYTES))
        resumed: list[int] = []
        try:
            async with server:
                fetch = await fetch_resuming(
                    lambda f: request_weights(port, into, f), NBYTES, 3, lambda f, _: resumed.append(f.done)
                )
        finally:
            snapshots.close()
        assert bytes(into) == data
        # Each try went on from the last whole chunk the one before received: the 123 bytes of a chunk
        # cut short were sent again, nothing else was.
        assert resumed == [CHUNK, 2 * CHUNK]
        assert sum(sent) == NBYTES + 123
        assert fetch.partial is not None and fetch.partial.round == 7
        assert NBYTES < fetch.received < NBYTES + 3 * 200  # the weights once, plus three short headers

    asyncio.run(main())


def test_a_fetch_cut_too_often_fails_and_one_without_progress_is_not_resumed(tmp_path: Path):
    async def main() -> None:
        snapshots = Snapshots()
        publish(snapshots, tmp_path, 3, weights(2))
        into = memoryview(bytearray(NBYTES))
        server, sent = await serve(snapshots, cut_after=[CHUNK, CHUNK, CHUNK])
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises((asyncio.IncompleteReadError, OSError)):
                await fetch_resuming(lambda f: request_weights(port, into, f), NBYTES, 1)
        assert sent == [CHUNK, CHUNK]  # one resume, then it gave up
        server, sent = await serve(snapshots, cut_after=[1000])  # less than a chunk: no progress to resume
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises((asyncio.IncompleteReadError, OSError)):
                await fetch_resuming(lambda f: request_weights(port, into, f), NBYTES, 5)
        assert sent == [1000]
        snapshots.close()

    asyncio.run(main())


def test_an_answer_in_progress_reads_its_round_to_the_end_while_newer_rounds_replace_it(tmp_path: Path):
    snapshots = Snapshots()
    first = weights(3)
    publish(snapshots, tmp_path, 1, first)
    served = snapshots.latest().serve(0)  # a joiner's fetch began on round 1
    for number in range(2, 2 + KEEP_SNAPSHOTS + 2):  # newer rounds: round 1's file is unlinked and closed
        publish(snapshots, tmp_path, number, weights(number + 10))
    assert not snapshot_path(tmp_path, 1).exists()
    assert snapshots.rounds() == [2 + KEEP_SNAPSHOTS, 3 + KEEP_SNAPSHOTS]
    assert len(list(tmp_path.glob("weights-*.bin"))) == KEEP_SNAPSHOTS
    assert snapshots.of_round(1) is None

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk

    sink = Sink()
    try:
        asyncio.run(send_from(sink, served))
    finally:
        served.close()
        snapshots.close()
    assert bytes(sink.data) == first


def test_wrong_hashes_values_sizes_and_resumes_are_refused(tmp_path: Path):
    data = bytearray(weights(4))
    sha256 = hashlib.sha256(data).hexdigest()
    header = {"type": "weights", "round": 5, "nbytes": NBYTES, "sha256": sha256, "offset": 0}

    class Reader:
        def __init__(self, body: bytes) -> None:
            self.body, self.at = body, 0

        async def readexactly(self, n: int) -> bytes:
            self.at += n
            return self.body[self.at - n : self.at]

    def receive(body: bytes, head: dict) -> bytes:
        into = memoryview(bytearray(NBYTES))
        asyncio.run(receive_into(Reader(body), into, check_header(head, NBYTES, None)))
        return bytes(into)

    assert receive(bytes(data), header) == bytes(data)
    flipped = bytearray(data)
    flipped[CHUNK + 5] ^= 1
    with pytest.raises(WeightsError, match="SHA-256"):
        receive(bytes(flipped), header)
    nan = bytearray(data)
    nan[-4:] = np.array([np.nan], dtype="<f4").tobytes()
    with pytest.raises(WeightsError, match="non-finite"):
        receive(bytes(nan), {**header, "sha256": hashlib.sha256(nan).hexdigest()})
    with pytest.raises(WeightsError, match="do not fit"):
        check_header({**header, "nbytes": NBYTES + 4}, NBYTES, None)
    with pytest.raises(WeightsError, match="fresh fetch"):
        check_header({**header, "offset": 8}, NBYTES, None)
    with pytest.raises(WeightsError, match="SHA-256"):
        check_header({**header, "sha256": "00"}, NBYTES, None)
    partial = check_header(header, NBYTES, None)
    partial.done = 4096
    with pytest.raises(WeightsError, match="resumed"):  # another round's bytes would not go on these
        check_header({**header, "round": 6, "offset": 4096}, NBYTES, partial)
    assert check_header({**header, "offset": 4096}, NBYTES, partial) is partial


def test_snapshot_files_of_a_later_round_from_an_earlier_life_are_removed(tmp_path: Path):
    for number in (40, 41, 42):
        write_snapshot(tmp_path, number, [b"\0" * 8])
    write_snapshot(tmp_path, 10, [b"\1" * 8])  # restarted from an older checkpoint
    assert sorted(p.name for p in tmp_path.glob("weights-*.bin")) == ["weights-00000010.bin"]
    assert os.path.getsize(snapshot_path(tmp_path, 10)) == 8


def test_the_weights_go_to_members_only_within_a_budget_and_the_budget_map_forgets_old_fetches(tmp_path):
    snapshots = Snapshots()
    server = WeightsServer(snapshots, lambda kind, **fields: {"type": kind, **fields})
    try:
        header, served = server.answer("m", True, {})
        assert header["type"] == "refuse" and "no weights yet" in header["reason"] and served is None
        publish(snapshots, tmp_path, 1, weights(1))
        header, served = server.answer("stranger", False, {})
        assert header["type"] == "refuse" and "go to its members" in header["reason"] and served is None
        answers = [server.answer("m", True, {}) for _ in range(WEIGHT_COPIES_PER_HOUR + 1)]
        for header, served in answers[:-1]:
            assert header["type"] == "weights" and header["nbytes"] == NBYTES and served is not None
            served.close()
        header, served = answers[-1]
        assert header["type"] == "refuse" and "times in the last hour" in header["reason"]
        # Another member has its own budget; an hour later the first has its budget back, and members
        # that fetched nothing in the last hour are not kept.
        header, served = server.answer("other", True, {})
        assert header["type"] == "weights" and served is not None
        served.close()
        for member in server._served:
            server._served[member] = [(t - BUDGET_WINDOW_S - 1, n) for t, n in server._served[member]]
        header, served = server.answer("m", True, {})
        assert header["type"] == "weights" and served is not None
        served.close()
        assert set(server._served) == {"m"}
        with pytest.raises(MessageError):
            server.answer("m", True, {"round": 1, "offset": NBYTES + 1})
    finally:
        snapshots.close()


def test_a_second_weights_request_while_the_first_is_answered_is_dropped(tmp_path):
    snapshots = Snapshots()
    publish(snapshots, tmp_path, 1, weights(1))
    server = WeightsServer(snapshots, lambda kind, **fields: {"type": kind, **fields})

    class Stalled:
        """A requester that never reads: the answer's first write waits until it is let go."""

        def __init__(self) -> None:
            self.go = asyncio.Event()

        async def write(self, data: bytes) -> None:
            await self.go.wait()

    async def scenario() -> None:
        stalled = Stalled()
        first = asyncio.create_task(server.serve("m", True, {}, stalled))
        await asyncio.sleep(0.01)
        with pytest.raises(MessageError, match="second weights request"):
            await server.serve("m", True, {}, stalled)
        stalled.go.set()
        await first
        await server.serve("m", True, {}, stalled)  # the first done: the next is served

    try:
        asyncio.run(scenario())
    finally:
        snapshots.close()
