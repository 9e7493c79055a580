import os
import stat

import pytest

from shoal.transport.errors import KeyFileError, MultiaddrError, ProtocolError
from shoal.transport.identity import (
    PeerID,
    b58decode,
    b58encode,
    generate_key,
    load_key_file,
    peer_id_from_key,
    write_key_file,
)
from shoal.transport.multiaddr import Multiaddr


def test_ed25519_peer_id_has_the_libp2p_text_form_and_round_trips():
    peer = peer_id_from_key(generate_key())
    text = str(peer)
    assert text.startswith("12D3KooW")  # identity multihash of an Ed25519 protobuf key
    assert PeerID.from_string(text) == peer
    assert peer.public_key() is not None and peer.public_key().peer_id() == peer


def test_known_peer_id_vector():
    # The key from libp2p's peer-id spec test vectors (Ed25519, identity multihash).
    encoded = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
    peer = PeerID.from_public_key_protobuf(encoded)
    assert str(peer) == "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_base58_round_trip_keeps_leading_zeros():
    for data in (b"", b"\0", b"\0\0abc", os.urandom(38)):
        assert b58decode(b58encode(data)) == data


def test_peer_id_text_rejects_garbage():
    for bad in ("", "0OIl", "12D3KooW" + "x" * 200, "QmShort"):
        with pytest.raises(ValueError):
            PeerID.from_string(bad)


def test_key_file_is_owner_only_and_loads_the_same_identity(tmp_path):
    key = generate_key()
    path = tmp_path / "peer.key"
    write_key_file(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id_from_key(load_key_file(path)) == peer_id_from_key(key)


def test_key_file_is_never_overwritten_by_accident(tmp_path):
    path = tmp_path / "peer.key"
    first = generate_key()
    write_key_file(path, first)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path, generate_key())
    assert peer_id_from_key(load_key_file(path)) == peer_id_from_key(first)
    second = generate_key()
    os.chmod(path, 0o644)
    write_key_file(path, second, overwrite=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id_from_key(load_key_file(path)) == peer_id_from_key(second)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "peer.key"
    write_key_file(path, generate_key())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


def test_key_file_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(KeyFileError, match="peer keygen"):
        load_key_file(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key at all")
    os.chmod(junk, 0o600)
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_key_file(junk)


def test_multiaddr_text_and_binary_forms():
    peer = peer_id_from_key(generate_key())
    addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
    assert addr.to_bytes()[:8] == bytes.fromhex("047f000001060fa1")  # spec example encoding
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert str(addr) == f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}"
    assert addr.peer_id == peer
    assert addr.tcp_endpoint() == ("127.0.0.1", 4001)
    assert addr.without_peer_id() == Multiaddr.parse("/ip4/127.0.0.1/tcp/4001")
    for text in ("/ip6/::1/tcp/80", "/dns4/example.com/tcp/443", "/ip4/1.2.3.4/udp/1/quic-v1"):
        parsed = Multiaddr.parse(text)
        assert str(parsed) == text
        assert Multiaddr.from_bytes(parsed.to_bytes()) == parsed
    assert Multiaddr.parse(f"/ipfs/{peer}") == Multiaddr.parse(f"/p2p/{peer}")


@pytest.mark.parametrize(
    "bad", ["", "ip4/1.2.3.4", "/ip4/1.2.3", "/ip4/1.2.3.4/tcp/70000", "/tcp", "/foo/1", "/ip4/1.2.3.4/tcp/x"]
)
def test_bad_multiaddr_text_is_refused(bad):
    with pytest.raises(MultiaddrError):
        Multiaddr.parse(bad)


def test_bad_multiaddr_bytes_are_refused():
    for bad in (b"\x04\x7f\x00", b"\xff\xff\xff\x7f", b"\x06", b"\xa5\x03\x05abc"):
        with pytest.raises(ProtocolError):
            Multiaddr.from_bytes(bad)
