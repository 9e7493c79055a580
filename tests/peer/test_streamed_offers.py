"""Round payloads streamed between real hosts on 127.0.0.1: the offer's header, then its raw bytes.

The receiver is the daemon's own `RoundSwap.answer_offer` behind a real run-protocol stream handler; its
inbox stands in for the worker's inbound segment. What a user relies on: a partner's payload lands whole and
checked or not at all, an offer that is refused is never read (a stranger cannot make us download its
bytes, and our upload stops when the partner refuses ours), and a transfer that outlives its round never
writes into the segment the next round uses. And a partner that answers nothing at all costs a round a
few seconds, not the exchange deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import pytest

from shoal.gossip.outer.methods import OuterConfig
from shoal.gossip.outer.wire import Message, pack, packed_bits
from shoal.gossip.rounds import payload as dense
from shoal.peer import round_swap
from shoal.peer.config import PeerConfig
from shoal.peer.offers import send_while_answered
from shoal.peer.round_swap import CONTROL_MESSAGE_LIMIT, Arrival, RoundReport, RoundSwap
from shoal.peer.status import StatusBoard
from shoal.peer.worker.model import GPT, PRESETS
from shoal.transport.errors import TransportError
from shoal.transport.host import Host, Stream
from shoal.transport.identity import PeerID, generate_key
from shoal.transport.messages import encode_message, read_frame, write_message

PROTOCOL = "/shoal-test/run/1"
METHOD = "compressed-noloco"
BITS = OuterConfig.tuned(METHOD).lattice_bits
SPEC = sorted((name, tuple(p.shape)) for name, p in GPT(PRESETS["tiny"]).named_parameters())


def lattice_message(
    origin: str, grow: int = 0, fill: int = 0x5A, step: float = 0.01, kind: str = METHOD
) -> bytes:
    """A message of the run's default method for the tiny model, optionally bent out of shape."""
    tensors = [bytes([fill]) * (packed_bits(math.prod(shape), BITS) + grow) for _, shape in SPEC]
    return pack(Message(kind, origin, 1, tensors=tensors, steps=[step] * len(SPEC)))


class Receiver:
    """A RoundSwap answering offers on a real host, with a bytearray for the worker's inbound segment."""

    def __init__(self, host: Host, exchange_timeout: float = 5.0):
        self.host = host
        self.swap = RoundSwap(
            str(host.peer_id),
            PeerConfig(run_id="r", exchange_timeout=exchange_timeout),
            StatusBoard(str(host.peer_id), "r"),
            asyncio.Event(),
            self._no_request,
            lambda kind, **fields: {"type": kind, **fields},
            lambda *_: None,
        )
        self.swap.use_model(SPEC, METHOD, BITS)
        self.segment = bytearray(dense.max_payload_bytes(SPEC))  # as large as the worker makes its segments
        self.swap.inbox = lambda nbytes: memoryview(self.segment)[:nbytes]
        self.streams: list[Stream] = []
        host.set_stream_handler(PROTOCOL, self.serve)

    @staticmethod
    async def _no_request(*_args: object, **_kwargs: object) -> tuple[dict, int, int]:
        raise AssertionError("the receiver sends no request in these tests")

    async def serve(self, stream: Stream) -> None:
        self.streams.append(stream)
        request, size = await read_frame(stream, CONTROL_MESSAGE_LIMIT)
        await self.swap.answer_offer(str(stream.remote_peer_id), request, size, stream)
        await stream.close()

    def in_round(self, number: int, partner: str | None) -> asyncio.Future[Arrival]:
        """Our own payload for `number` is ready and the pairing named `partner` (what `_exchange` does)."""
        arrival: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self.swap.incoming[number] = arrival
        self.swap.book.ready(number, partner)
        return arrival


@contextlib.asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[Host, Receiver]]:
    async with (
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as sender,
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as host,
    ):
        await sender.connect(f"{host.listen_addrs[0]}/p2p/{host.peer_id}")
        yield sender, Receiver(host)


async def offer(sender: Host, to: Receiver, number: int, payload: bytes) -> tuple[dict, int]:
    """Our offer as the daemon sends it: the header, then the payload streamed while the answer is read."""
    stream = await sender.new_stream(to.host.peer_id, PROTOCOL)
    await write_message(stream, {"type": "offer", "round": number, "nbytes": len(payload)})
    (reply, _), sent = await send_while_answered(
        stream, memoryview(payload), read_frame(stream, CONTROL_MESSAGE_LIMIT)
    )
    return reply, sent


async def test_a_partners_payload_lands_whole_in_the_inbox_and_is_accepted():
    async with two_hosts() as (sender, receiver):
        payload = lattice_message(str(sender.peer_id))
        arrival = receiver.in_round(1, str(sender.peer_id))
        reply, sent = await offer(sender, receiver, 1, payload)
        assert reply == {"type": "accept", "round": 1}
        assert sent == len(payload)
        arrived = await asyncio.wait_for(arrival, 5)
        assert arrived.failure is None and arrived.payload_bytes == len(payload)
        assert bytes(receiver.segment[: len(payload)]) == payload


async def test_an_invalid_payload_from_the_partner_is_refused_struck_and_ends_our_wait_at_once(caplog):
    async with two_hosts() as (sender, receiver):
        partner = str(sender.peer_id)
        bad = {
            "does not match the model": lattice_message(partner, grow=1),
            "lattice steps are missing, non-finite": lattice_message(partner, step=float("nan")),
            "this run uses": lattice_message(partner, kind="noloco"),
        }
        for number, (why, payload) in enumerate(bad.items(), start=1):
            arrival = receiver.in_round(number, partner)
            reply, _ = await offer(sender, receiver, number, payload)
            assert reply["type"] == "refuse" and "invalid payload" in reply["reason"], reply
            assert why in reply["reason"], reply
            arrived = await asyncio.wait_for(arrival, 5)  # at once, not at the exchange deadline
            assert arrived.failure is not None and "invalid payload" in arrived.failure
            receiver.swap.book.finish(number)
        assert receiver.swap.strikes == {partner: 3}
        assert receiver.swap.banned == {partner}  # three invalid messages: banned here
        assert "after 3 invalid messages" in caplog.text


async def test_a_refused_offer_is_never_read_and_the_senders_upload_stops():
    async with two_hosts() as (sender, receiver):
        receiver.in_round(1, "12D3KooWsomeoneelse")  # our partner is another peer
        big = bytes(receiver.swap.max_offer_bytes - 1024)  # 1.7 MB: far more than a stream's window
        reply, sent = await offer(sender, receiver, 1, big)
        assert reply["type"] == "refuse" and "my partner in round 1 is" in reply["reason"], reply
        assert sent == 0  # the upload was cut when the refusal came, not finished
        assert not any(receiver.segment)  # nothing of it landed
        assert receiver.swap.strikes == {}  # being someone else's partner is no offence


async def test_an_offer_larger_than_the_model_allows_is_dropped_at_its_header():
    async with two_hosts() as (sender, receiver):
        receiver.in_round(1, str(sender.peer_id))
        stream = await sender.new_stream(receiver.host.peer_id, PROTOCOL)
        too_big = receiver.swap.max_offer_bytes + 1
        await write_message(stream, {"type": "offer", "round": 1, "nbytes": too_big})
        with pytest.raises((asyncio.IncompleteReadError, TransportError)):
            await asyncio.wait_for(read_frame(stream, CONTROL_MESSAGE_LIMIT), 5)
        assert not any(receiver.segment)


async def test_a_payload_still_arriving_when_its_round_ends_writes_nothing_more_into_the_inbox():
    async with two_hosts() as (sender, receiver):
        partner = str(sender.peer_id)
        arrival = receiver.in_round(1, partner)
        payload = lattice_message(partner, fill=0xFF)
        stream = await sender.new_stream(receiver.host.peer_id, PROTOCOL)
        await stream.write(encode_message({"type": "offer", "round": 1, "nbytes": len(payload)}))
        half = len(payload) // 2
        await stream.write(payload[:half])
        # Wait until the receiver took the first half in, then end the round (its deadline passed).
        for _ in range(200):
            if receiver.segment[half - 1] == 0xFF:
                break
            await asyncio.sleep(0.01)
        assert receiver.segment[half - 1] == 0xFF
        receiver.swap.book.finish(1)
        await stream.write(payload[half:])
        await stream.close()
        reply, _ = await asyncio.wait_for(read_frame(stream, CONTROL_MESSAGE_LIMIT), 5)
        assert reply["type"] == "refuse" and "round 1 is over" in reply["reason"], reply
        assert not any(receiver.segment[half:])  # the second half never landed
        arrived = await asyncio.wait_for(arrival, 5)
        assert arrived.failure is not None and "ended while" in arrived.failure


async def test_an_offer_as_large_as_the_model_allows_fits_the_inbox_and_is_judged():
    async with two_hosts() as (sender, receiver):
        partner = str(sender.peer_id)
        receiver.in_round(1, partner)
        reply, sent = await offer(sender, receiver, 1, bytes(receiver.swap.max_offer_bytes))
        assert sent == receiver.swap.max_offer_bytes == len(receiver.segment)  # read whole, into the inbox
        assert reply["type"] == "refuse" and "invalid payload" in reply["reason"], reply  # zeros: no message


class Waiter:
    """A RoundSwap in its round with `partner`, whose requests go over a real host: the side of a round that
    sends its offer and waits for the partner's."""

    def __init__(self, host: Host):
        async def request(target, message, limit, progress=None, pace=None, body=None):
            stream = await host.new_stream(PeerID.from_string(target), PROTOCOL)
            await write_message(stream, message)
            if body is None:
                await stream.close()
                reply, received = await read_frame(stream, limit)
                return reply, 0, received
            (reply, received), sent = await send_while_answered(stream, body, read_frame(stream, limit))
            return reply, sent, received

        self.swap = RoundSwap(
            str(host.peer_id),
            PeerConfig(run_id="r", exchange_timeout=60.0),
            StatusBoard(str(host.peer_id), "r"),
            asyncio.Event(),
            request,
            lambda kind, **fields: {"type": kind, **fields},
            lambda *_: None,
        )

    def round_with(self, partner: str, number: int) -> asyncio.Task:
        self.swap.incoming[number] = asyncio.get_running_loop().create_future()
        self.swap.book.ready(number, partner)
        report = RoundReport(number, partner, "", 0, 0)
        payload = memoryview(lattice_message(str(self.swap.peer_id)))
        task = asyncio.ensure_future(self.swap._both_ways(partner, number, payload, report))
        task.report = report  # type: ignore[attr-defined]
        return task


async def test_a_partner_that_answers_nothing_is_given_up_early_and_one_that_answers_is_waited_for(
    monkeypatch,
):
    monkeypatch.setattr(round_swap, "SILENT_PARTNER_S", 1.0)

    async def silent(stream: Stream) -> None:  # a member that heartbeats but never answers: a sybil
        await asyncio.sleep(3600)

    async def training(stream: Stream) -> None:  # an honest partner still training its round
        request, _ = await read_frame(stream, CONTROL_MESSAGE_LIMIT)
        if request["type"] == "status":
            await write_message(stream, {"type": "status", "round": 1, "finished": 0, "partner": None,
                                         "ready": False})  # fmt: skip
            await stream.close()
        else:
            await asyncio.sleep(3600)  # its offer is held until its own round is ready

    async with (
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as me,
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as sybil,
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as honest,
    ):
        sybil.set_stream_handler(PROTOCOL, silent)
        honest.set_stream_handler(PROTOCOL, training)
        for other in (sybil, honest):
            await me.connect(f"{other.listen_addrs[0]}/p2p/{other.peer_id}")
        waiter = Waiter(me)
        started = asyncio.get_running_loop().time()
        with_sybil = waiter.round_with(str(sybil.peer_id), 1)
        await asyncio.wait_for(asyncio.shield(with_sybil), 10)
        assert with_sybil.report.outcome == f"skipped: partner {sybil.peer_id} answered nothing for 1 s"
        assert asyncio.get_running_loop().time() - started < 10  # not the 60 s exchange deadline
        waiter.swap.book.finish(1)

        with_honest = waiter.round_with(str(honest.peer_id), 2)
        await asyncio.sleep(4)  # four times the silence allowed: its status answers say it is coming
        assert not with_honest.done(), with_honest.report.outcome
        with_honest.cancel()
        await asyncio.gather(with_honest, return_exceptions=True)


async def test_an_offer_that_arrives_while_the_partner_is_asked_how_it_is_ends_the_wait_at_once(monkeypatch):
    """Waiting for the partner's offer, a peer asks the partner how it is doing every PROBE_INTERVAL. On a
    full link the answer waits behind the payloads; an offer that arrives meanwhile must end the round at
    once, not once the answer comes (that cost 0.4 s of a 0.55 s swap at 100 Mbit/s)."""
    monkeypatch.setattr(round_swap, "PROBE_INTERVAL", 0.05)
    monkeypatch.setattr(round_swap, "ROUND_QUERY_TIMEOUT", 3600.0)  # the answer never comes
    asked = asyncio.Event()

    async def partner(stream: Stream) -> None:
        request, _ = await read_frame(stream, CONTROL_MESSAGE_LIMIT)
        if request["type"] == "status":
            asked.set()
            await asyncio.sleep(3600)
        await stream.readexactly(request["nbytes"])  # our offer, taken whole
        await write_message(stream, {"type": "accept", "round": request["round"]})
        await stream.close()

    async with (
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as me,
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as other,
    ):
        other.set_stream_handler(PROTOCOL, partner)
        await me.connect(f"{other.listen_addrs[0]}/p2p/{other.peer_id}")
        waiter = Waiter(me)
        swapping = waiter.round_with(str(other.peer_id), 1)
        await asyncio.wait_for(asked.wait(), 10)  # the question is out and will not be answered
        waiter.swap.incoming[1].set_result(Arrival(payload_bytes=100, wire_bytes=120))  # its offer is in
        await asyncio.wait_for(swapping, 10)
        assert swapping.report.outcome == "swapped"  # type: ignore[attr-defined]
        assert swapping.report.payload_bytes == 100  # type: ignore[attr-defined]
