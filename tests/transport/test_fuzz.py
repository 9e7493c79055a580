"""Hostile bytes into every decoder: at worst a ProtocolError; never a crash, a hang or a big allocation."""

import asyncio
import contextlib

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.transport import identify
from shoal.transport.errors import ProtocolError
from shoal.transport.host import Host, HostLimits
from shoal.transport.identity import PeerID, PublicKey, generate_key
from shoal.transport.multiaddr import Multiaddr
from shoal.transport.multistream import (
    MAX_MESSAGE_LENGTH,
    MultistreamDialer,
    MultistreamListener,
    encode_message,
)
from shoal.transport.noise import MAX_FRAME_LENGTH, NoiseHandshake
from shoal.transport.protobuf import iter_fields
from shoal.transport.varint import decode_uvarint
from shoal.transport.yamux import DataReceived, YamuxSession

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
chunks = st.lists(st.binary(max_size=200), max_size=20)


def feed_all(receive, parts):
    try:
        for part in parts:
            receive(part)
    except ProtocolError:
        return False
    return True


@FUZZ
@given(st.binary(max_size=2000))
def test_small_decoders_only_raise_protocol_errors(data):
    for decode in (Multiaddr.from_bytes, PeerID.from_bytes, PublicKey.from_protobuf, identify.unframe):
        with contextlib.suppress(ProtocolError):
            decode(data)
    with contextlib.suppress(ProtocolError):
        list(iter_fields(data))
    with contextlib.suppress(ProtocolError):
        decode_uvarint(data)


@FUZZ
@given(chunks)
def test_multistream_listener_and_dialer_survive_random_bytes(parts):
    listener, dialer = MultistreamListener(["/a"]), MultistreamDialer(["/a", "/b"])
    feed_all(listener.receive_data, parts)
    feed_all(dialer.receive_data, parts)
    assert len(listener._reader._buffer) <= 4 * (MAX_MESSAGE_LENGTH + 2) + 65536 + 200


@FUZZ
@given(st.integers(0, 599), st.integers(1, 255))
def test_multistream_mutated_valid_exchange(position, xor):
    wire = bytearray(encode_message("/multistream/1.0.0") + encode_message("/a") + encode_message("/b"))
    wire[position % len(wire)] ^= xor
    listener = MultistreamListener(["/a"])
    if feed_all(listener.receive_data, [bytes(wire)]) and listener.done:
        assert listener.selected == "/a"


@FUZZ
@given(chunks)
def test_noise_responder_survives_random_handshake_bytes(parts):
    responder = NoiseHandshake(initiator=False, identity_key=KEY)
    feed_all(responder.receive_data, parts)
    assert len(responder._buffer) <= MAX_FRAME_LENGTH + 2 + 200


@FUZZ
@given(st.integers(0, 10_000), st.integers(1, 255), st.integers(1, 97))
def test_noise_handshake_with_one_mutated_byte_fails_cleanly_or_is_unaffected(position, xor, split):
    init = NoiseHandshake(initiator=True, identity_key=KEY)
    resp = NoiseHandshake(initiator=False, identity_key=KEY2)
    msg1 = init.data_to_send()
    resp.receive_data(msg1)
    msg2 = bytearray(resp.data_to_send())
    position %= len(msg2)
    msg2[position] ^= xor
    parts = [bytes(msg2[i : i + split]) for i in range(0, len(msg2), split)]
    if feed_all(init.receive_data, parts):
        # Only a changed length prefix can leave the initiator waiting; it must not have finished.
        assert position < 2 and not init.done


@FUZZ
@given(chunks)
def test_noise_transport_refuses_random_frames(parts):
    _, resp = handshaken()
    recv = resp.transport()
    feed_all(recv.receive_data, parts)
    assert len(recv._partial) <= MAX_FRAME_LENGTH + 2


WINDOW = 256 * 1024


@FUZZ
@given(chunks)
def test_yamux_survives_random_frames_and_never_buffers_past_its_window(parts):
    session = YamuxSession(is_client=False, window=WINDOW)
    delivered: dict[int, int] = {}

    def receive(part):
        for event in session.receive_data(part):
            if isinstance(event, DataReceived):
                delivered[event.stream_id] = delivered.get(event.stream_id, 0) + len(event.data)

    feed_all(receive, parts)
    assert all(size <= WINDOW for size in delivered.values())
    assert len(session._header_buf) < 12


@FUZZ
@given(st.integers(0, 5000), st.integers(1, 255), st.integers(1, 300))
def test_yamux_mutated_valid_stream(position, xor, split):
    client = YamuxSession(is_client=True, window=WINDOW)
    for _ in range(3):
        sid = client.open_stream()
        client.send_data(sid, bytes(range(200)) * 5)
        client.send_fin(sid)
    client.ping()
    wire = bytearray(b"".join(bytes(f) for f in client.data_to_send()))
    wire[position % len(wire)] ^= xor
    server = YamuxSession(is_client=False, window=WINDOW)
    parts = [bytes(wire[i : i + split]) for i in range(0, len(wire), split)]
    feed_all(server.receive_data, parts)
    assert server.stream_count <= 3 + 1


KEY = generate_key()
KEY2 = generate_key()


def handshaken():
    init = NoiseHandshake(initiator=True, identity_key=KEY)
    resp = NoiseHandshake(initiator=False, identity_key=KEY2)
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    resp.receive_data(init.data_to_send())
    return init, resp


# ------------------------------------------------------------------ the whole host, over real sockets

PREFIXES = [
    b"",
    encode_message("/multistream/1.0.0") + encode_message("/noise"),
    encode_message("/multistream/1.0.0") + encode_message("/noise") + b"\x00\x20",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PREFIXES), st.binary(max_size=3000))
def test_host_drops_hostile_connections_and_keeps_serving(prefix, junk):
    async def scenario():
        limits = HostLimits(handshake_timeout_s=0.5)
        async with (
            await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"], limits=limits) as server,
            await Host.create(generate_key()) as client,
        ):
            host, port = server.listen_addrs[0].tcp_endpoint()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(prefix + junk)
            # The server refuses or times the connection out: reading ends, it never hangs.
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
            writer.close()
            # ...and a real peer is still served.
            assert await client.connect(f"{server.listen_addrs[0]}/p2p/{server.peer_id}") == server.peer_id
            assert await client.ping(server.peer_id) > 0

    uvloop.run(scenario())
