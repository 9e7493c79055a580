"""The STUN codec and responder: what aioice reads, what hostile bytes get (nothing), real sockets."""

import asyncio
import os
import socket
import struct

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.transport.nat import stun


def test_binding_success_is_what_aioice_reads_as_the_mapped_address():
    request, txid = stun.binding_request()
    parsed = aioice_stun.parse_message(request)
    assert parsed.message_method == aioice_stun.Method.BINDING
    reply = stun.answer(request, ("198.51.100.7", 40123))
    message = aioice_stun.parse_message(reply)
    assert message.transaction_id == txid
    assert message.attributes["XOR-MAPPED-ADDRESS"] == ("198.51.100.7", 40123)


def test_aioice_request_gets_an_answer_and_ipv6_round_trips():
    request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    reply = stun.answer(bytes(request), ("2001:db8::5", 9))
    assert stun.parse(reply).mapped == ("2001:db8::5", 9)
    assert stun.parse(reply).transaction_id == request.transaction_id


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00\x00" + b"\x00" * 16,  # wrong magic cookie
        struct.pack(">HHI12s", 1, 8, stun.MAGIC_COOKIE, os.urandom(12)),  # length says 8, body is empty
        struct.pack(">HHI12s", 0xC001, 0, stun.MAGIC_COOKIE, os.urandom(12)),  # top type bits set
        struct.pack(">HHI12s", 0x0111, 0, stun.MAGIC_COOKIE, os.urandom(12)),  # an error response
        struct.pack(">HHI12s", 1, 1000, stun.MAGIC_COOKIE, os.urandom(12)) + bytes(1000),  # oversized
        # an attribute that claims 60 bytes where 4 follow
        struct.pack(">HHI12s", 1, 8, stun.MAGIC_COOKIE, os.urandom(12)) + struct.pack(">HHI", 0x20, 60, 0),
    ],
)
def test_malformed_messages_get_no_answer(data):
    assert stun.answer(data, ("127.0.0.1", 1)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_no_answer(data):
    reply = stun.answer(data, ("127.0.0.1", 1))
    assert reply is None or stun.parse(reply).kind == stun.BINDING_SUCCESS


async def test_responder_tells_udp_and_tcp_clients_their_address():
    responder = await stun.StunResponder.start("127.0.0.1", 0)
    try:
        server = ("127.0.0.1", responder.port)
        ip, port = await stun.query_udp(server)
        assert ip == "127.0.0.1" and port > 0
        (ip, port), local = await stun.query_tcp(server)
        assert (ip, port) == ("127.0.0.1", local)
        # The same local port again, to a second server: what a hole punch does to spot a symmetric NAT
        # before it connects from that port.
        second = await stun.StunResponder.start("127.0.0.1", 0)
        try:
            (_, again), _ = await stun.query_tcp(("127.0.0.1", second.port), local)
            assert again == local
        finally:
            second.close()
    finally:
        responder.close()


async def test_responder_closes_a_tcp_client_that_announces_an_oversized_message():
    responder = await stun.StunResponder.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", responder.port)
        writer.write(struct.pack(">HHI12s", 1, 4000, stun.MAGIC_COOKIE, os.urandom(12)))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
        writer.close()
        await writer.wait_closed()
    finally:
        responder.close()


async def test_udp_query_to_a_silent_port_fails_with_a_clear_error():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(stun.StunError, match="no STUN answer"):
            await stun.query_udp(silent.getsockname())
    finally:
        silent.close()
