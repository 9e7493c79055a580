"""A joiner's fetch of the run's weights (peer/join_fetch.py): spans from several members at once over real
sockets, a cut member's rest taken by others, made-up weights found by probing other members and fetched
again from honest ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shoal.peer import join_fetch
from shoal.peer.join_fetch import (
    LONE_TOLERANCE,
    TOLERANCE_FLOOR,
    FetchFailed,
    JoinFetch,
    judge,
)
from shoal.peer.weights import CHUNK, Snapshots, WeightsServer
from shoal.peer.weights_fetch import WeightsFetcher
from shoal.peer.worker.snapshots import write_snapshot
from shoal.transport.messages import read_message, write_message

SPAN = 2 * CHUNK
NBYTES = 5 * SPAN + 4 * 1000  # five spans and a short one
COUNT = NBYTES // 4


def run_weights(seed: int = 0) -> np.ndarray:
    """The weights the run's members hold near: a trained model's scale."""
    return (0.02 * np.random.default_rng(seed).standard_normal(COUNT)).astype("<f4")


def member_weights(number: int, spread: float = 0.05) -> np.ndarray:
    """A member's own φ: the run's, moved by `spread` of its norm (pairwise averaging keeps them near)."""
    base = run_weights()
    noise = np.random.default_rng(100 + number).standard_normal(COUNT).astype("<f4")
    return (base + spread * np.linalg.norm(base) / np.sqrt(COUNT) * noise).astype("<f4")


@dataclass
class Member:
    """A member answering weights and probe requests from its snapshot over TCP, with the real server."""

    name: str
    data: np.ndarray
    round: int = 7
    cut_after: int | None = None  # every weights answer stops after this many bytes (the link fails)
    port: int = 0
    served: int = 0  # bytes of weights it sent

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_message(reader)
            if request["type"] == "probe":
                await write_message(writer, await self.server.probe("joiner", True, request))
            else:
                await self.server.serve("joiner", True, request, CuttingWriter(self, writer))
        except ConnectionResetError:
            pass
        finally:
            writer.close()


class CuttingWriter:
    def __init__(self, member: Member, writer: asyncio.StreamWriter) -> None:
        self.member, self.writer, self.sent = member, writer, 0

    async def write(self, data: bytes) -> None:
        limit = self.member.cut_after
        if limit is not None and self.sent + len(data) > limit and self.sent > 0:
            self.writer.transport.abort()  # only the header frame was sent alone: weights bytes follow it
            raise ConnectionResetError("cut")
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)
        self.member.served += len(data)


@contextlib.asynccontextmanager
async def serving(members: list[Member], directory: Path) -> AsyncIterator[None]:
    servers, snapshots = [], []
    for member in members:
        held = Snapshots()
        (directory / member.name).mkdir(exist_ok=True)
        path, nbytes = write_snapshot(directory / member.name, member.round, [member.data.tobytes()])
        held.add(member.round, str(path), nbytes)
        snapshots.append(held)
        member.server = WeightsServer(held, lambda kind, **fields: {"type": kind, **fields})  # type: ignore[attr-defined]
        server = await asyncio.start_server(member.handle, "127.0.0.1", 0)
        member.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    try:
        yield
    finally:
        for server in servers:
            server.close()
        for held in snapshots:
            held.close()


class StreamOf:
    """An asyncio connection with the transport streams' calls (awaitable write, half-close, reset)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.write_eof()

    async def reset(self) -> None:
        self.writer.transport.abort()

    async def read(self, n: int = -1) -> bytes:
        return await self.reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def expect(self, n: int) -> None:
        """A TCP connection has no per-stream window to open."""


class NoReach:
    def rate_bps(self, peer: str) -> None:
        return None

    def record(self, *args: object, **kwargs: object) -> None:
        pass


def fetch(members: list[Member], tmp_path: Path):
    """Runs a JoinFetch against the members (asked, and probed, in the given order): (result, weights)."""
    ports = {m.name: m.port for m in members}

    async def main():
        async with serving(members, tmp_path):
            ports.update({m.name: m.port for m in members})

            async def open_stream(peer: str) -> StreamOf:
                return StreamOf(*await asyncio.open_connection("127.0.0.1", ports[peer]))

            fetcher = WeightsFetcher(
                "joiner", open_stream, lambda kind, **f: {"type": kind, **f}, NoReach(), 5.0
            )  # type: ignore[arg-type]
            names = [m.name for m in members]
            join = JoinFetch(names, names, fetcher.attempt, fetcher.probe)
            into = memoryview(bytearray(NBYTES))
            try:
                return await join.run(into), np.frombuffer(bytes(into), dtype="<f4"), join
            finally:
                into.release()

    return asyncio.run(main())


def senders_of_each_chunk(got: np.ndarray, members: list[Member]) -> list[str]:
    """Which member's bytes each chunk is, exactly (a chunk is always one member's, whole)."""
    names = []
    for start in range(0, COUNT, CHUNK // 4):
        piece = slice(start, min(COUNT, start + CHUNK // 4))
        same = [m.name for m in members if np.array_equal(got[piece], m.data[piece])]
        assert same, f"the chunk at {start} is no member's"
        names.append(same[0])
    return names


@pytest.fixture(autouse=True)
def small_spans(monkeypatch):
    monkeypatch.setattr(join_fetch, "SPAN", SPAN)


def test_three_members_send_spans_at_once_and_a_cut_one_leaves_its_rest_to_the_others(tmp_path):
    members = [Member("a", member_weights(1)), Member("b", member_weights(2)), Member("c", member_weights(3))]
    members[1].cut_after = CHUNK + 5000  # each of b's answers delivers one whole chunk, then its link fails
    result, got, join = fetch(members, tmp_path)
    senders = senders_of_each_chunk(got, members)
    assert set(result.senders) >= {"a", "c"}
    assert result.round == 7 and not result.refused
    # b's whole chunks were kept (its spans' first chunks), the rest of each came from whoever was free.
    b = join.senders["b"]
    assert b.spans and all((end - start) % CHUNK == 0 or end == NBYTES for start, end in b.spans)
    assert sum(result.senders.values()) == NBYTES
    assert b.cuts >= 1
    assert len(senders) == 11 and set(senders) == {"a", "b", "c"}
    assert all("from other members'" in why for why in result.checks.values()), result.checks


def test_made_up_weights_are_refused_and_their_spans_come_from_honest_members(tmp_path):
    honest = [member_weights(n) for n in (1, 2, 3)]
    norm = float(np.linalg.norm(honest[0]))
    noise = (np.random.default_rng(9).standard_normal(COUNT) * norm / np.sqrt(COUNT)).astype("<f4")
    members = [Member("liar", noise), *(Member(f"h{n}", w) for n, w in enumerate(honest))]
    result, got, _ = fetch(members, tmp_path)
    assert "liar" in result.refused and "from other members'" in result.refused["liar"]
    assert "liar" not in result.senders
    assert "liar" not in senders_of_each_chunk(got, members[1:])  # every span is an honest member's
    assert members[0].served > 0  # it did send spans: they were checked, refused and fetched again


def test_a_few_huge_values_the_sampled_coordinates_miss_are_caught_by_the_spans_norms(tmp_path):
    spiked = member_weights(4).copy()
    spiked[np.random.default_rng(5).choice(COUNT, 20, replace=False)] = 1e3  # 20 of 2.6 M values
    members = [Member("spiked", spiked), Member("h1", member_weights(1)), Member("h2", member_weights(2))]
    result, got, _ = fetch(members, tmp_path)
    assert "spiked" in result.refused and "norm" in result.refused["spiked"], result.refused
    assert np.abs(got).max() < 1.0


def test_members_at_different_rounds_make_one_mosaic_of_the_newest_round(tmp_path):
    """Gossip lags fast rounds: members send the rounds they are at, which the fetch takes (the daemon
    bounds the round it believes by what the run's members published)."""
    members = [Member("ahead", member_weights(1), round=26), Member("h", member_weights(2), round=19)]
    result, _, join = fetch(members, tmp_path)
    assert not join.dropped and set(result.senders) == {"ahead", "h"} and result.round == 26


def test_a_member_cut_again_and_again_is_dropped_after_its_resumes(tmp_path):
    alone = [Member("flaky", member_weights(1))]
    alone[0].cut_after = CHUNK + 5000
    with pytest.raises(FetchFailed, match="flaky: cut"):
        fetch(alone, tmp_path)
    # Each span's second chunk came on a second try; after RESUMES + 1 cuts it was not asked again.
    assert alone[0].served < NBYTES


def test_when_every_member_lies_or_fails_the_fetch_fails_with_each_ones_reason(tmp_path):
    zeros = np.zeros(COUNT, dtype="<f4")
    members = [Member("zeros", zeros), Member("h", member_weights(1))]
    members[1].cut_after = 100  # never delivers a chunk
    with pytest.raises(FetchFailed) as failed:
        fetch(members, tmp_path)
    assert "zeros: its values are" in str(failed.value) and "h: cut" in str(failed.value)


def test_judge_takes_honest_spreads_and_refuses_attacks():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1024)

    def near(spread: float, seed: int) -> np.ndarray:
        return base + spread * np.random.default_rng(seed).standard_normal(1024)

    sums = [[float(base @ base)]]
    checkers = [near(0.1, 1), near(0.1, 2), near(0.1, 3)]
    honest = near(0.1, 4)
    assert judge(honest, checkers, [float(honest @ honest)], sums * 3).ok
    # The checkers just averaged with one another (0.011 apart) and the sender did not: the floor holds.
    close = [near(0.008, 1), near(0.008, 2)]
    assert judge(near(0.1, 5), close, [float(base @ base)], sums * 2).ok
    for attack in (
        100 * base,
        -base,
        np.zeros(1024),
        rng.standard_normal(1024),
        base + 0.5 * rng.standard_normal(1024),
    ):
        verdict = judge(attack, checkers, [float(attack @ attack)], sums * 3)
        assert not verdict.ok and verdict.distance is not None and verdict.distance > verdict.tolerance
    # One lying checker of three cannot refuse an honest sender; one of two cannot either.
    liar = 50 * rng.standard_normal(1024)
    assert judge(honest, [checkers[0], checkers[1], liar], [float(honest @ honest)], sums * 3).ok
    assert judge(honest, [checkers[0], liar], [float(honest @ honest)], sums * 2).ok
    # One checker: a fixed bound; none: unchecked, said so.
    lone = judge(honest, [checkers[0]], [float(honest @ honest)], sums)
    assert lone.ok and lone.tolerance == LONE_TOLERANCE
    assert judge(honest, [], [0.0], []).why.startswith("unchecked")
    nan = honest.copy()
    nan[3] = np.nan
    assert not judge(nan, checkers, [float(honest @ honest)], sums * 3).ok
    assert TOLERANCE_FLOOR < LONE_TOLERANCE
