"""Deadlines from sizes and measured rates (peer/deadlines.py): the arithmetic, the idle and total deadlines
over real sockets, a daemon that serves a slow but steady request and cuts a silent one, and the slow-link
note in the log and in `peer status`."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shoal.peer import deadlines
from shoal.peer.config import PeerConfig
from shoal.peer.round_swap import RoundSwap
from shoal.peer.status import StatusBoard
from shoal.transport.messages import encode_message, read_frame

MB = 1_000_000


def test_a_transfer_gets_the_time_its_size_needs_at_the_rate_within_the_ceiling():
    # 32 MB at a measured 3 Mbit/s: 85 s of transfer, twice that with the margin, plus the floor.
    assert deadlines.transfer_deadline(32 * MB, 3e6, 1e9) == pytest.approx(10 + 2 * 85.33, abs=0.1)
    # Unmeasured: the minimum rate (1 Mbit/s); capped by the ceiling.
    assert deadlines.transfer_deadline(MB, None, 1e9) == pytest.approx(10 + 16)
    assert deadlines.transfer_deadline(344 * MB, None, 1800) == 1800
    # A small message gets about the floor.
    assert deadlines.transfer_deadline(1000, 1e6, 1e9) == pytest.approx(10.0, abs=0.1)


def test_an_exchange_waits_at_least_the_exchange_timeout_and_at_most_its_stretch():
    assert deadlines.exchange_deadline(100_000, 100e6, 30) == 30  # fast: the option rules
    # 8 MB each way at 3 Mbit/s: 10 + 2 * 42.7 s > 30 s
    assert deadlines.exchange_deadline(8 * MB, 3e6, 30) == pytest.approx(10 + 2 * 42.67, abs=0.1)
    assert deadlines.exchange_deadline(32 * MB, 0.4e6, 30) == 4 * 30  # too slow: the ceiling
    # The least rate at which the bytes make it in time: they take exactly that long at it.
    need = deadlines.needed_rate_bps(32 * MB, 120)
    assert deadlines.transfer_seconds(32 * MB, need) == pytest.approx(120)


def test_a_slow_link_is_named_with_its_rate_and_what_it_needs():
    text = deadlines.describe_slow("the link to X", 344 * MB, 2.1e6, 1800, "a weights fetch")
    assert text.startswith("the link to X delivered 2.1 Mbit/s; 344 MB would take 22 min")
    assert "a weights fetch allows 30 min: it needs at least 1.5 Mbit/s" in text


async def _serve_one(handler) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task, object]:
    """A loopback TCP server that runs `handler(reader)` on its one connection; the client's end."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await handler(reader))
        except Exception as error:  # handed to the test as the outcome
            done.set_result(error)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, done, server  # type: ignore[return-value]


async def _read_paced(reader: asyncio.StreamReader, idle: float, rate: float | None) -> tuple[float, object]:
    """Reads one frame as the daemon does: the prefix under `idle`, the body by its size, `idle` between
    bytes; returns how long it took and the message (or the error)."""
    started = time.monotonic()
    async with deadlines.paced(idle, idle) as pace:

        def progress(done: int, total: int) -> None:
            if done == 0:
                pace.extend(pace.waited() + deadlines.transfer_deadline(total, rate, 60.0))

        message, _ = await read_frame(pace.watch(reader), 1 << 24, progress)
    return time.monotonic() - started, message


def test_a_slow_steady_sender_is_read_to_the_end_and_a_silent_one_is_cut_at_the_idle_deadline():
    frame = encode_message({"type": "offer", "payload": bytes(200_000)})
    idle = 0.5

    async def send_slowly(writer: asyncio.StreamWriter, pieces: int, pause: float, stop_after: int) -> None:
        step = len(frame) // pieces + 1
        for i in range(0, len(frame), step):
            if i // step >= stop_after:
                return  # goes silent, the connection stays open
            writer.write(frame[i : i + step])
            await writer.drain()
            await asyncio.sleep(pause)

    async def scenario() -> tuple[object, object]:
        outcomes = []
        for stop_after in (10**6, 5):
            _, writer, done, server = await _serve_one(lambda r: _read_paced(r, idle, None))
            async with server:  # type: ignore[attr-defined]
                # 20 pieces, 0.2 s apart: 4 s in all, 8 times the idle deadline, never idle that long
                await send_slowly(writer, 20, 0.2, stop_after)
                outcomes.append(await asyncio.wait_for(done, 30))
                writer.close()
        return outcomes[0], outcomes[1]

    steady, silent = asyncio.run(scenario())
    assert isinstance(steady, tuple), steady
    seconds, message = steady
    assert message["type"] == "offer" and len(message["payload"]) == 200_000
    assert seconds > 3 * idle  # took far longer than the idle deadline, and was not cut
    assert isinstance(silent, TimeoutError), silent


def test_the_idle_deadline_says_it_was_the_one_that_passed():
    async def scenario() -> deadlines.Pace:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x00\x00\x10\x00")  # a 4096-byte body, never sent
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with deadlines.paced(5.0, 0.3) as pace:
                pace.extend(60.0)
                await read_frame(pace.watch(reader), 1 << 20)
        assert 0.2 < time.monotonic() - started < 3.0
        return pace

    pace = asyncio.run(scenario())
    assert pace.expired() and pace.idled


class _Reach:
    """The measured rates a RoundSwap asks about, fixed for the test."""

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = rates

    def rate_bps(self, peer: str) -> float | None:
        return self.rates.get(peer)


def _round_swap(board: StatusBoard, exchange_timeout: float) -> RoundSwap:
    config = PeerConfig(run_id="r", exchange_timeout=exchange_timeout)

    async def request(*_args: object) -> tuple[dict, int, int]:
        raise AssertionError("no request in this test")

    return RoundSwap("me", config, board, asyncio.Event(), request, dict, lambda *_: None)


def test_a_round_says_when_its_bytes_set_the_deadline_and_names_a_too_slow_link_once(caplog):
    board = StatusBoard("me", "r")
    swap = _round_swap(board, exchange_timeout=120)
    swap.reach = _Reach({"fast": 100e6, "slowish": 3e6, "slow": 0.4e6})  # type: ignore[assignment]

    assert swap.exchange_deadline("fast", 32 * MB) == (120, "")
    deadline, why = swap.exchange_deadline("slowish", 32 * MB)
    assert deadline == pytest.approx(10 + 4 * 85.33, abs=0.1)
    assert why == f"waiting up to {deadline:.0f} s: 2 × 32 MB at the measured 3 Mbit/s"
    deadline, why = swap.exchange_deadline("unknown", 8 * MB)
    assert "an assumed 1 Mbit/s (not measured yet)" in why
    assert not board.slow_links

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            deadline, _why = swap.exchange_deadline("slow", 32 * MB)
    assert deadline == 480  # the ceiling: 4 × --exchange-timeout
    warnings = [r.getMessage() for r in caplog.records if "the link to slow" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per partner
    assert "delivered 0.4 Mbit/s; 64 MB would take 21 min" in warnings[0]
    assert "(4 × --exchange-timeout 120 s) allows 8 min: it needs at least 1.1 Mbit/s" in warnings[0]

    board.set_activity("waiting", "waiting for partner slow to send its round 3")
    assert "Slow link: the link to slow delivered 0.4 Mbit/s" in board.why()
    board.on_event("round", {"round": 4, "partner": "slow", "outcome": "swapped", "bytes_sent": 1,
                             "bytes_received": 1})  # fmt: skip
    assert "Slow link" not in board.why()


@pytest.mark.slow  # a real peer process, and 10-20 s of slow sending
def test_a_daemon_reads_a_slow_steady_request_past_the_old_10_s_and_cuts_a_silent_one(start_peer):
    from shoal.peer.daemon import PROTOCOL_VERSION, RUN_PROTOCOL
    from shoal.transport.errors import TransportError
    from shoal.transport.host import Host
    from shoal.transport.identity import generate_key
    from shoal.transport.multiaddr import Multiaddr

    args = "--run slow --listen 127.0.0.1:0 --rounds 1000 --inner-steps 50 --threads 1"
    peer = start_peer("target", *args.split())
    address = peer.wait_for(lambda e: e["event"] == "listening")["address"]
    peer.wait_for(lambda e: e["event"] == "worker")  # requests up to max_offer_bytes from here on

    async def scenario() -> tuple[float, dict | None, float, float]:
        target = Multiaddr.parse(address)
        async with await Host.create(generate_key(), []) as host:
            me = str(host.peer_id)
            # 200 KB (a members request, padded; a stranger's requests stay under 256 KiB) at about
            # 80 kbit/s: some 20 s, past the old 10 s.
            request = {"v": PROTOCOL_VERSION, "type": "members", "run": "slow", "from": me, "table": []}
            frame = encode_message({**request, "pad": bytes(200_000)})
            stream = await host.new_stream(target.peer_id, RUN_PROTOCOL, [target])
            started = time.monotonic()
            for i in range(0, len(frame), 5_000):
                await stream.write(frame[i : i + 5_000])
                await asyncio.sleep(0.5)
            await stream.close()
            async with asyncio.timeout(30):
                reply, _ = await read_frame(stream, 1 << 24)
            steady_s = time.monotonic() - started

            # The same start, then silence: cut IDLE_TIMEOUT after the last byte.
            stream = await host.new_stream(target.peer_id, RUN_PROTOCOL, [target])
            await stream.write(frame[:50_000])
            last_byte = time.monotonic()
            cut: dict | None = None
            try:
                async with asyncio.timeout(60):
                    cut, _ = await read_frame(stream, 1 << 24)
            except (asyncio.IncompleteReadError, TransportError):
                pass
            return steady_s, reply, time.monotonic() - last_byte, cut is None

    steady_s, reply, silent_s, was_cut = asyncio.run(scenario())
    assert reply is not None and reply["type"] == "members", reply
    assert steady_s > 12, steady_s  # it really was slower than the old fixed deadline
    assert was_cut
    assert deadlines.IDLE_TIMEOUT - 2 < silent_s < deadlines.IDLE_TIMEOUT + 15, silent_s
    assert peer.process.poll() is None
    assert "request ended early" in peer.log_path.read_text(), peer.log_tail()
