"""Hostile peers against the NAT services: malformed and oversized requests, third-party dial-backs.

Every case checks that the misbehaving stream gets nothing useful and that the service still serves
an honest peer afterwards.
"""

import asyncio
import contextlib
import struct

import msgpack
import pytest

from shoal.transport.errors import TransportError
from shoal.transport.host import Host
from shoal.transport.identity import generate_key
from shoal.transport.messages import encode_message, read_message
from shoal.transport.nat import holepunch, reachability, relay
from shoal.transport.nat.paths import NatConfig, NatService

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@contextlib.asynccontextmanager
async def server_and_client():
    async with (
        await Host.create(generate_key(), [LOOPBACK]) as server,
        await Host.create(generate_key(), []) as client,
    ):
        service = NatService(server, NatConfig(serve_relay=True, stun_servers=(("127.0.0.1", 9),)))
        await service.start()
        await client.connect(f"{server.listen_addrs[0]}/p2p/{server.peer_id}")
        try:
            yield server, client
        finally:
            await service.close()


async def answer_to(client, server, protocol, raw):
    """What the service sends back to `raw` before it closes or resets the stream (b"" if nothing)."""
    stream = await client.new_stream(server.peer_id, protocol)
    await stream.write(raw)
    await stream.close()
    data = b""
    with contextlib.suppress(TransportError, asyncio.IncompleteReadError):
        async with asyncio.timeout(15):
            while chunk := await stream.read():
                data += chunk
    return data


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff" * 64,  # a length prefix of 4 GiB
        struct.pack(">I", relay.MAX_RELAY_MESSAGE + 1) + bytes(16),  # just over the limit
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        encode_message({"v": 1, "type": "connect", "peer": b"\x00"}),  # no valid peer id
        encode_message({"v": 99, "type": "reserve"}),  # unknown version
        encode_message({"v": 1, "type": "connect", "peer": [1, 2, 3]}),  # wrong type
    ],
)
async def test_relay_refuses_malformed_hop_requests_and_keeps_serving(raw):
    async with server_and_client() as (server, client):
        reply = await answer_to(client, server, relay.HOP_PROTOCOL, raw)
        if reply:
            assert msgpack.unpackb(reply[4:])["status"] == "refused"
        reservation = await relay.reserve(client, f"{server.listen_addrs[0]}/p2p/{server.peer_id}")
        assert reservation.relay == server.peer_id


async def test_autonat_never_dials_an_address_off_the_requesters_ip():
    accepted = []
    bystander = await asyncio.start_server(lambda r, w: accepted.append(w) or w.close(), "127.0.0.2", 0)
    port = bystander.sockets[0].getsockname()[1]
    try:
        async with server_and_client() as (server, client):
            from shoal.transport.multiaddr import Multiaddr

            target = Multiaddr.from_tcp("127.0.0.2", port).to_bytes()
            stream = await client.new_stream(server.peer_id, reachability.PROTOCOL)
            await stream.write(encode_message({"v": 1, "addrs": [target] * 50}))
            reply = await read_message(stream)
            assert reply["status"] == "refused"
            assert accepted == []
    finally:
        bystander.close()
        await bystander.wait_closed()


@pytest.mark.parametrize(
    "message",
    [
        {"v": 1, "type": "connect", "addrs": [b"\x00\x01"]},  # an undecodable multiaddr
        {"v": 1, "type": "connect", "addrs": "nope"},
        {"v": 1, "type": "ice-offer", "sdp": "x" * (holepunch.MAX_SDP_CHARS + 1)},
        {"v": 1, "type": "reverse", "addrs": []},
    ],
)
async def test_punch_responder_drops_malformed_requests_without_connecting(message):
    async with server_and_client() as (server, client):
        reply = await answer_to(client, server, holepunch.PROTOCOL, encode_message(message))
        if reply:
            answer = msgpack.unpackb(reply[4:])
            assert not answer.get("addrs") and not answer.get("sdp")
        dialed = [c for c in server._all_conns if c.remote_peer_id == client.peer_id and not c.inbound]
        assert dialed == []
