"""Relays over real Hosts on 127.0.0.1: reservations, secure circuits end to end, and every limit."""

import asyncio
import contextlib
import os

import pytest

from shoal.transport.errors import StreamResetError, TransportError
from shoal.transport.host import Host
from shoal.transport.identity import generate_key
from shoal.transport.nat.conduit import connection_to, path_of
from shoal.transport.nat.relay import (
    RelayError,
    RelayLimits,
    RelayService,
    StopHandler,
    circuit_addr,
    dial_relayed,
    reserve,
    split_circuit_addr,
)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def echo(stream):
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


def full_addr(host):
    return f"{host.listen_addrs[0]}/p2p/{host.peer_id}"


@contextlib.asynccontextmanager
async def relay_and_two(limits=None):
    async with (
        await Host.create(generate_key(), [LOOPBACK]) as relay,
        await Host.create(generate_key(), []) as a,
        await Host.create(generate_key(), []) as b,
    ):
        service = RelayService(relay, limits or RelayLimits())
        b.set_stream_handler("/echo/1", echo)
        stop = StopHandler(b)
        yield service, a, b, stop


async def reserved_addr(b, stop, relay_host):
    reservation = await reserve(b, full_addr(relay_host))
    stop.relays.add(reservation.relay)
    return reservation.relayed_addrs(b.peer_id)[0]


async def test_circuit_carries_a_secure_connection_between_peers_without_listeners():
    async with relay_and_two() as (service, a, b, stop):
        addr = await reserved_addr(b, stop, service.host)
        assert split_circuit_addr(addr) == (service.host.listen_addrs[0], service.host.peer_id, b.peer_id)
        conn = await dial_relayed(a, addr)
        assert conn.remote_peer_id == b.peer_id and path_of(conn) == "relay"
        assert connection_to(a, b.peer_id) is conn
        stream = await a.new_stream(b.peer_id, "/echo/1")
        payload = os.urandom(3 << 20)
        writer = asyncio.create_task(stream.write(payload))
        assert await stream.readexactly(len(payload)) == payload
        await writer
        # The relay forwarded only ciphertext: more bytes than the payload, none of it readable.
        assert service.bytes_relayed > 2 * len(payload)
        assert await a.ping(b.peer_id) >= 0


async def test_connect_to_a_peer_without_reservation_is_refused():
    async with relay_and_two() as (service, a, b, _):
        addr = circuit_addr(service.host.listen_addrs[0], service.host.peer_id, b.peer_id)
        await b.connect(full_addr(service.host))  # connected, but no reservation
        with pytest.raises(RelayError, match="no reservation"):
            await dial_relayed(a, addr)


async def test_reservation_cap_refuses_the_next_peer():
    async with relay_and_two(RelayLimits(max_reservations=1)) as (service, a, b, stop):
        await reserved_addr(b, stop, service.host)
        with pytest.raises(RelayError, match="maximum of 1 reservations"):
            await reserve(a, full_addr(service.host))
        await reserve(b, full_addr(service.host))  # renewing one's own slot is not a new one


async def test_circuit_is_cut_at_its_byte_limit():
    limit = 1 << 20
    async with relay_and_two(RelayLimits(circuit_bytes=limit)) as (service, a, b, stop):
        addr = await reserved_addr(b, stop, service.host)
        await dial_relayed(a, addr)
        stream = await a.new_stream(b.peer_id, "/echo/1")
        with pytest.raises((StreamResetError, TransportError, asyncio.IncompleteReadError)):
            writer = asyncio.create_task(stream.write(os.urandom(4 * limit)))
            try:
                await stream.readexactly(4 * limit)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        assert service.circuits_cut == 1
        assert service.bytes_relayed <= limit
        for _ in range(100):
            if service.circuits == 0:
                break
            await asyncio.sleep(0.01)
        assert service.circuits == 0


async def test_stop_side_refuses_circuits_from_relays_it_did_not_reserve_at():
    async with relay_and_two() as (service, a, b, _stop):
        await reserve(b, full_addr(service.host))  # reserved, but b's StopHandler does not know the relay
        addr = circuit_addr(service.host.listen_addrs[0], service.host.peer_id, b.peer_id)
        with pytest.raises(RelayError, match="refused the circuit"):
            await dial_relayed(a, addr)


async def test_circuit_is_cut_when_its_duration_is_over():
    async with relay_and_two(RelayLimits(circuit_duration_s=0.5)) as (service, a, b, stop):
        addr = await reserved_addr(b, stop, service.host)
        conn = await dial_relayed(a, addr)
        await asyncio.wait_for(conn.closed, 10)  # the relay resets the circuit; the connection ends
        assert service.circuits_cut == 1
