import pytest

from shoal.transport.errors import DecryptError, HandshakeError, PeerIDMismatchError
from shoal.transport.identity import generate_key, peer_id_from_key
from shoal.transport.noise import MAX_PLAINTEXT_LENGTH, NoiseHandshake


def handshake(expected=None, tamper=None):
    """Run XX between two fresh identities; `tamper(step, bytes)` may alter a message in flight."""
    a, b = generate_key(), generate_key()
    init = NoiseHandshake(initiator=True, identity_key=a, expected_peer=expected(b) if expected else None)
    resp = NoiseHandshake(initiator=False, identity_key=b)
    tamper = tamper or (lambda _step, data: data)
    resp.receive_data(tamper(1, init.data_to_send()))
    init.receive_data(tamper(2, resp.data_to_send()))
    resp.receive_data(tamper(3, init.data_to_send()))
    return a, b, init, resp


def test_handshake_proves_both_identities():
    a, b, init, resp = handshake(expected=peer_id_from_key)
    assert init.done and resp.done
    assert init.remote_peer_id == peer_id_from_key(b)
    assert resp.remote_peer_id == peer_id_from_key(a)


def test_dialer_refuses_a_peer_other_than_the_one_dialed():
    other = peer_id_from_key(generate_key())
    with pytest.raises(PeerIDMismatchError, match="dialed peer"):
        handshake(expected=lambda _b: other)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_any_altered_handshake_byte_fails_the_handshake(step):
    def flip(at, data):
        if at != step:
            return data
        data = bytearray(data)
        data[-1] ^= 0x01  # last byte: inside the payload/tag of every message
        return bytes(data)

    # Message 1 is a cleartext ephemeral key: altering it makes the transcripts diverge, which then
    # fails authentication on the next message; messages 2 and 3 fail their own tags.
    with pytest.raises(HandshakeError):
        handshake(tamper=flip)


def test_transport_round_trips_across_any_split_of_the_byte_stream():
    _, _, init, resp = handshake()
    send, recv = init.transport(), resp.transport()
    messages = [b"", b"a", bytes(range(256)) * 10, b"z" * MAX_PLAINTEXT_LENGTH]
    wire: list[bytes] = []
    for message in messages:
        send.encrypt(message, wire)
    stream = b"".join(wire)
    for step in (1, 7, 1000, 65537, len(stream)):
        # Decrypting needs the right nonce sequence: start from a fresh pair for each split.
        _, _, i2, r2 = handshake()
        s2, d2 = i2.transport(), r2.transport()
        wire2: list[bytes] = []
        for message in messages:
            s2.encrypt(message, wire2)
        blob = b"".join(wire2)
        got = []
        for pos in range(0, len(blob), step):
            got.extend(d2.receive_data(blob[pos : pos + step]))
        assert got == messages
    assert recv.receive_data(stream) == messages


def test_one_flipped_ciphertext_bit_is_detected():
    _, _, init, resp = handshake()
    send, recv = init.transport(), resp.transport()
    wire: list[bytes] = []
    send.encrypt(b"transfer 100 tokens to alice", wire)
    frame = bytearray(b"".join(wire))
    frame[5] ^= 0x20
    with pytest.raises(DecryptError, match="altered"):
        recv.receive_data(bytes(frame))


def test_replayed_frame_is_refused():
    _, _, init, resp = handshake()
    send, recv = init.transport(), resp.transport()
    wire: list[bytes] = []
    send.encrypt(b"once", wire)
    frame = b"".join(wire)
    assert recv.receive_data(frame) == [b"once"]
    with pytest.raises(DecryptError):
        recv.receive_data(frame)  # the nonce moved on: a replay does not authenticate


def test_oversized_plaintext_is_refused():
    _, _, init, _ = handshake()
    with pytest.raises(ValueError):
        init.transport().encrypt(b"x" * (MAX_PLAINTEXT_LENGTH + 1), [])


def test_early_muxer_negotiation_picks_the_initiators_first_common_muxer():
    def run(init_muxers, resp_muxers):
        init = NoiseHandshake(initiator=True, identity_key=generate_key(), muxers=init_muxers)
        resp = NoiseHandshake(initiator=False, identity_key=generate_key(), muxers=resp_muxers)
        resp.receive_data(init.data_to_send())
        init.receive_data(resp.data_to_send())
        resp.receive_data(init.data_to_send())
        assert init.selected_muxer == resp.selected_muxer
        return init.selected_muxer

    assert run(["/yamux/1.0.0", "/mplex/6.7.0"], ["/mplex/6.7.0", "/yamux/1.0.0"]) == "/yamux/1.0.0"
    assert run(["/mplex/6.7.0"], ["/yamux/1.0.0"]) is None  # no overlap: fall back to multistream
    assert run(["/yamux/1.0.0"], []) is None  # a peer without the extension (py-libp2p 0.8.1)
