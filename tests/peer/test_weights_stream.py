"""Weights for joining peers (peer/weights.py, peer/worker/snapshots.py): streamed from the worker's snapshot
files a span at a time, to members only within a budget; what arrives is checked against the span asked and
for non-finite values; probes answer other members' values. Fetches from several members: test_join_fetch."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from shoal.peer.weights import (
    BUDGET_WINDOW_S,
    CHUNK,
    PROBE_VALUES,
    PROBES_PER_HOUR,
    WEIGHT_COPIES_PER_HOUR,
    Snapshots,
    Span,
    WeightsError,
    WeightsServer,
    check_header,
    receive_span,
    send_from,
)
from shoal.peer.worker.snapshots import KEEP_SNAPSHOTS, snapshot_path, write_snapshot
from shoal.transport.messages import MessageError

NBYTES = 3 * CHUNK + 4 * 1000  # a few chunks and a short last one


def weights(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(NBYTES // 4).astype("<f4").tobytes()


def publish(snapshots: Snapshots, directory: Path, round_: int, data: bytes) -> None:
    """What the worker and its daemon do after a round: the file written, then held open."""
    path, nbytes = write_snapshot(directory, round_, [data])
    snapshots.add(round_, str(path), nbytes)


class AsyncWriter:
    """An asyncio StreamWriter with the transport streams' awaitable write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.sent = 0

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)


def test_an_answer_in_progress_reads_its_round_to_the_end_while_newer_rounds_replace_it(tmp_path: Path):
    snapshots = Snapshots()
    first = weights(3)
    publish(snapshots, tmp_path, 1, first)
    served = snapshots.latest().serve(0, NBYTES)  # a joiner's fetch began on round 1
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


class Reader:
    def __init__(self, body: bytes) -> None:
        self.body, self.at = body, 0

    async def readexactly(self, n: int) -> bytes:
        if self.at + n > len(self.body):
            raise asyncio.IncompleteReadError(self.body[self.at :], n)
        self.at += n
        return self.body[self.at - n : self.at]


def test_a_span_lands_in_place_by_whole_chunks_and_bad_headers_and_values_are_refused():
    data = weights(4)
    header = {"type": "weights", "round": 5, "nbytes": NBYTES, "offset": CHUNK, "length": 2 * CHUNK}
    span = Span(CHUNK, 3 * CHUNK)
    assert check_header(header, NBYTES, span) == 5
    into = memoryview(bytearray(NBYTES))
    asyncio.run(receive_span(Reader(data[CHUNK : 3 * CHUNK]), into, span))
    assert span.done == 3 * CHUNK and bytes(into[CHUNK : 3 * CHUNK]) == data[CHUNK : 3 * CHUNK]
    assert bytes(into[:CHUNK]) == bytes(CHUNK)  # nothing outside the span was touched

    # Cut after a chunk and a half: the whole chunk counts, the half is asked again.
    span = Span(0, 3 * CHUNK)
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(receive_span(Reader(data[: CHUNK + CHUNK // 2]), into, span))
    assert span.done == CHUNK and span.request_fields() == {"offset": CHUNK, "length": 2 * CHUNK}

    nan = bytearray(data[: 2 * CHUNK])
    nan[CHUNK + 8 : CHUNK + 12] = np.array([np.nan], dtype="<f4").tobytes()
    span = Span(0, 2 * CHUNK)
    with pytest.raises(WeightsError, match="non-finite"):
        asyncio.run(receive_span(Reader(bytes(nan)), into, span))
    assert span.done == CHUNK  # the bad chunk was not taken
    with pytest.raises(WeightsError, match="do not fit"):
        check_header({**header, "nbytes": NBYTES + 4}, NBYTES, Span(CHUNK, 3 * CHUNK))
    with pytest.raises(WeightsError, match="asked for bytes"):
        check_header({**header, "offset": 0}, NBYTES, Span(CHUNK, 3 * CHUNK))
    with pytest.raises(WeightsError, match="asked for bytes"):
        check_header({**header, "length": CHUNK}, NBYTES, Span(CHUNK, 3 * CHUNK))
    with pytest.raises(WeightsError, match="without its round"):
        check_header({**header, "round": "5"}, NBYTES, Span(CHUNK, 3 * CHUNK))


def test_a_span_is_served_from_its_offset_to_its_length_and_bad_spans_are_malformed(tmp_path):
    snapshots = Snapshots()
    data = weights(6)
    publish(snapshots, tmp_path, 2, data)
    server = WeightsServer(snapshots, lambda kind, **fields: {"type": kind, **fields})

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk

    try:
        header, served = server.answer("m", True, {"offset": CHUNK, "length": CHUNK + 40})
        assert header == {
            "type": "weights",
            "round": 2,
            "nbytes": NBYTES,
            "offset": CHUNK,
            "length": CHUNK + 40,
        }
        assert served is not None
        sink = Sink()
        asyncio.run(send_from(sink, served))
        served.close()
        assert bytes(sink.data) == data[CHUNK : 2 * CHUNK + 40]
        header, served = server.answer("m", True, {"offset": NBYTES - 8})  # no length: to the end
        assert header["length"] == 8 and served is not None
        served.close()
        for bad in ({"offset": 2}, {"offset": 0, "length": NBYTES + 4}, {"offset": 0, "length": 0},
                    {"offset": NBYTES}, {"offset": -4}, {"length": "all"}):  # fmt: skip
            with pytest.raises(MessageError):
                server.answer("m", True, bad)
    finally:
        snapshots.close()


def test_a_probe_answers_values_and_sums_of_squares_to_members_within_a_budget(tmp_path):
    snapshots = Snapshots()
    data = weights(7)
    publish(snapshots, tmp_path, 3, data)
    server = WeightsServer(snapshots, lambda kind, **fields: {"type": kind, **fields})
    values = np.frombuffer(data, dtype="<f4")

    def probe(sender: str, request: dict, member: bool = True) -> dict:
        return asyncio.run(server.probe(sender, member, request))

    try:
        indices, spans = [0, 5, NBYTES // 4 - 1], [[0, CHUNK], [CHUNK, NBYTES]]
        answer = probe("m", {"indices": indices, "spans": spans})
        assert answer["type"] == "probe" and answer["round"] == 3
        assert np.array_equal(np.frombuffer(answer["values"], dtype="<f4"), values[indices])
        expected = [float(values[: CHUNK // 4].astype(np.float64) @ values[: CHUNK // 4]),
                    float(values[CHUNK // 4 :].astype(np.float64) @ values[CHUNK // 4 :])]  # fmt: skip
        assert answer["sumsq"] == pytest.approx(expected, rel=1e-9)
        assert probe("stranger", {"indices": [0], "spans": []}, member=False)["type"] == "refuse"
        malformed = [
            {"indices": [NBYTES // 4], "spans": []},
            {"indices": [-1], "spans": []},
            {"indices": list(range(PROBE_VALUES + 1)), "spans": []},
            {"indices": [0], "spans": [[0, 6]]},
            {"indices": [0], "spans": [[0, NBYTES + 4]]},
            {"indices": [0.5], "spans": []},
            {},
        ]
        for bad in malformed:
            with pytest.raises(MessageError):
                probe("m", bad)
        for _ in range(PROBES_PER_HOUR - 1):
            assert probe("m", {"indices": [1], "spans": []})["type"] == "probe"
        assert probe("m", {"indices": [1], "spans": []})["type"] == "refuse"
        assert probe("other", {"indices": [1], "spans": []})["type"] == "probe"  # a budget each
    finally:
        snapshots.close()


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
        assert header["type"] == "refuse" and "copies of the weights this hour" in header["reason"]
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
