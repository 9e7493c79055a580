"""Wire messages: well-formed ones round-trip; malformed, oversized or mistyped ones are refused."""

import contextlib
import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dht.core import DHTCore
from shoal.dht.errors import InvalidMessage
from shoal.dht.keys import as_int, node_id, run_key
from shoal.dht.protocol import (
    ADD_PROVIDER,
    FIND_NODE,
    GET_PROVIDERS,
    MAX_DHT_MESSAGE_BYTES,
    STORE,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shoal.dht.records import Record
from shoal.dht.routing import Contact
from shoal.transport.identity import b58encode
from shoal.transport.identity_work import meets, mine

NOW = 1_000_000.0


def me() -> Contact:
    return Contact.of(os.urandom(32), ["/ip4/127.0.0.1/tcp/9"])


def test_requests_and_responses_roundtrip() -> None:
    k = Ed25519PrivateKey.generate()
    rec = Record.provider_record(k, run_key("r"), ["/ip4/1.2.3.4/tcp/5"], 3, NOW + 60)
    req = Request(ADD_PROVIDER, 7, me(), record=rec)
    assert decode_request(encode_request(req)) == req
    resp = Response(7, [me() for _ in range(20)], providers=[rec])
    assert decode_response(encode_response(resp)) == resp


def worked_contact(bits: int) -> Contact:
    peer = os.urandom(32)
    work = mine(b58encode(peer), bits)
    assert work is not None
    return Contact.of(peer, ["/ip4/127.0.0.1/tcp/9"], work)


def test_contacts_without_the_networks_identity_work_are_refused() -> None:
    worked = worked_contact(12)
    lazy = next(c for c in (me() for _ in range(100)) if not meets(b58encode(c.peer_id), 0, 12))
    assert decode_request(encode_request(Request(FIND_NODE, 1, worked, bytes(32))), 12).sender == worked
    with pytest.raises(InvalidMessage, match="12 bits of identity work"):
        decode_request(encode_request(Request(FIND_NODE, 1, lazy, bytes(32))), 12)
    # One unworked contact in an answer drops the whole answer: an honest node never learnt it.
    assert decode_response(encode_response(Response(1, [worked, worked])), 12).nodes == [worked, worked]
    with pytest.raises(InvalidMessage, match="identity work"):
        decode_response(encode_response(Response(1, [worked, lazy])), 12)


def test_a_node_id_comes_from_the_work_so_a_new_nonce_moves_the_node() -> None:
    c = worked_contact(4)
    assert c.id == as_int(node_id(c.peer_id, c.work))
    # Another nonce for the same key lands elsewhere: where a node sits is bound to work proven for it,
    # so choosing a spot near a key means mining proofs until one lands there, not only generating keys.
    assert node_id(c.peer_id, c.work) != node_id(c.peer_id, c.work + 1)
    assert node_id(c.peer_id, c.work) != node_id(c.peer_id, 0) or c.work == 0


@pytest.mark.parametrize(
    "msg",
    [
        {"v": 1, "t": FIND_NODE, "rid": 1, "from": [b"p", [], 0], "key": bytes(32)},  # an old version
        {"v": 2, "t": 99, "rid": 1, "from": [b"p", [], 0]},  # unknown type
        {"v": 2, "t": FIND_NODE, "rid": -1, "from": [b"p", [], 0], "key": bytes(32)},  # bad rid
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", [], 0], "key": b"short"},  # bad key
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"", [], 0], "key": bytes(32)},  # empty peer id
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", [1, 2], 0], "key": bytes(32)},  # addrs not str
        {
            "v": 2,
            "t": FIND_NODE,
            "rid": 1,
            "from": [b"p", []],
            "key": bytes(32),
        },  # no work (version 1's shape)
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", [], -1], "key": bytes(32)},  # negative nonce
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", [], 1.0], "key": bytes(32)},  # nonce a float
        {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", [], True], "key": bytes(32)},  # nonce not an int
        {"v": 2, "t": STORE, "rid": 1, "from": [b"p", [], 0]},  # store without record
        {"v": 2, "t": STORE, "rid": 1, "from": [b"p", [], 0], "rec": [1, 2, 3]},  # malformed record
        [1, 2, 3],  # not a map
    ],
)
def test_malformed_requests_are_refused(msg) -> None:
    with pytest.raises(InvalidMessage):
        decode_request(msgpack.packb(msg, use_bin_type=True))


def test_oversized_and_bomb_messages_are_refused_before_allocation() -> None:
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode_request(b"\x80" * (MAX_DHT_MESSAGE_BYTES + 1))
    # A 5-byte header claiming a 4 GiB array: msgpack's limits refuse it without allocating.
    with pytest.raises(InvalidMessage):
        decode_request(b"\xdd\xff\xff\xff\xff")
    huge_list = {"v": 2, "t": FIND_NODE, "rid": 1, "from": [b"p", ["/a"] * 1000, 0], "key": bytes(32)}
    with pytest.raises(InvalidMessage):
        decode_request(msgpack.packb(huge_list))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(InvalidMessage):
            decode(data)


def test_core_refuses_unsigned_wrongly_signed_and_foreign_records() -> None:
    holder = DHTCore(Ed25519PrivateKey.generate())
    k = Ed25519PrivateKey.generate()
    sender = Contact.of(Record.value_record(k, b"n", b"v", 1, NOW + 60).publisher)
    good = Record.value_record(k, b"n", b"v", 1, NOW + 60)
    unsigned = Record(good.kind, good.key, good.publisher, 1, good.expires, b"n", b"v", (), bytes(64))
    other = Record.value_record(Ed25519PrivateKey.generate(), b"n", b"v", 1, NOW + 60)
    for bad in (unsigned, other):
        assert not holder.handle(Request(STORE, 1, sender, record=bad), "10.0.0.1", NOW).ok
    # The wrong kind for the request: a value record offered as a provider announcement.
    assert not holder.handle(Request(ADD_PROVIDER, 2, sender, record=good), "10.0.0.1", NOW).ok
    assert len(holder.store) == 0 and holder.dropped == 3
    assert holder.handle(Request(STORE, 3, sender, record=good), "10.0.0.1", NOW).ok
    assert len(holder.store) == 1


def test_core_answers_provider_lookups_with_closer_nodes_and_providers() -> None:
    holder = DHTCore(Ed25519PrivateKey.generate())
    peers = [me() for _ in range(30)]
    for p in peers:
        holder.observe(p, NOW)
    k = Ed25519PrivateKey.generate()
    rec = Record.provider_record(k, run_key("r"), ["/ip4/1.2.3.4/tcp/5"], 1, NOW + 60)
    assert holder.handle(Request(ADD_PROVIDER, 1, Contact.of(rec.publisher), record=rec), "1.2.3.4", NOW).ok
    asker = peers[0]
    resp = holder.handle(Request(GET_PROVIDERS, 2, asker, run_key("r")), "10.0.0.1", NOW)
    assert [r.publisher for r in resp.providers] == [rec.publisher]
    assert len(resp.nodes) == 20 and asker not in resp.nodes


def test_a_newer_withdrawal_from_one_holder_beats_an_older_announcement_from_another() -> None:
    # The network changed between a peer's announcement and its withdrawal: one holder kept the
    # announcement, another got the withdrawal. A lookup that hears both must not list the peer.
    k = Ed25519PrivateKey.generate()
    announced = Record.provider_record(k, run_key("r"), ["/ip4/1.2.3.4/tcp/5"], 1, NOW + 60)
    withdrawn = Record.provider_record(k, run_key("r"), [], 2, NOW + 60)
    stale, fresh = DHTCore(Ed25519PrivateKey.generate()), DHTCore(Ed25519PrivateKey.generate())
    for holder, rec in ((stale, announced), (fresh, announced), (fresh, withdrawn)):
        assert holder.handle(
            Request(ADD_PROVIDER, 1, Contact.of(rec.publisher), record=rec), "1.2.3.4", NOW
        ).ok
    asker = DHTCore(Ed25519PrivateKey.generate())
    answers = [
        (
            Contact.of(h.peer_id, ["/ip4/127.0.0.1/tcp/9"]),
            h.handle(Request(GET_PROVIDERS, 2, me(), run_key("r")), "10.0.0.1", NOW),
        )
        for h in (fresh, stale)
    ]
    assert [r.addrs for r in answers[0][1].providers] == [()]  # the withdrawal is part of the answer
    for order in (answers, answers[::-1]):
        q = asker.query(GET_PROVIDERS, run_key("r"))
        for contact, resp in order:
            q.on_response(contact, resp, NOW)
        assert q.providers == {}


def test_a_sender_without_addresses_is_answered_but_not_routed_to() -> None:
    holder = DHTCore(Ed25519PrivateKey.generate())
    client, server = Contact.of(me().peer_id), me()  # a NATed peer in client mode gives no address
    assert client.addrs == () and server.addrs
    for n, sender in enumerate((client, server)):
        assert holder.handle(Request(FIND_NODE, n, sender, run_key("r")), "10.0.0.1", NOW).ok
    assert [c.peer_id for c in holder.table.contacts()] == [server.peer_id]
