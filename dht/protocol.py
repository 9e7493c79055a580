"""The DHT's wire messages: six requests, one response shape, msgpack maps with hard limits.

Everything here is hostile until `decode_*` returns: sizes are checked before msgpack allocates
(max_*_len), then every field's type and size. Records inside are parsed but their signatures are
checked where they are used (the store, the lookup), so a bad one costs at most its own slot.
"""

from dataclasses import dataclass, field

import msgpack

from shoal.dht.errors import InvalidMessage, InvalidRecord
from shoal.dht.keys import KEY_BYTES
from shoal.dht.records import MAX_ADDR_LEN, MAX_ADDRS, Record
from shoal.dht.routing import Contact, K
from shoal.transport.identity import b58encode
from shoal.transport.identity_work import meets, valid_nonce

PROTOCOL_ID = "/shoal/kad/2.0.0"  # Shoal's own protocol id: never mixes with the IPFS Amino DHT
VERSION = 2  # 2: every contact carries its identity-work nonce, and node ids derive from it

PING, FIND_NODE, FIND_VALUE, STORE, ADD_PROVIDER, GET_PROVIDERS = range(1, 7)
REQUEST_TYPES = frozenset({PING, FIND_NODE, FIND_VALUE, STORE, ADD_PROVIDER, GET_PROVIDERS})
RESPONSE = 0

MAX_DHT_MESSAGE_BYTES = (
    128 * 1024
)  # one response: k contacts + a page of provider records, with room to spare
MAX_PEER_ID = 64  # raw Ed25519 key today, a PeerID multihash (38 bytes) tomorrow
MAX_NODES = K  # contacts per answer: the paper's k
MAX_PROVIDERS_RETURNED = 32  # provider records per answer; a run's peers find the rest by gossip
MAX_RID = 2**32 - 1

_UNPACK_LIMITS = dict(
    max_bin_len=MAX_DHT_MESSAGE_BYTES,
    max_str_len=MAX_ADDR_LEN,
    max_array_len=max(MAX_NODES, MAX_PROVIDERS_RETURNED, 9),
    max_map_len=16,
    max_ext_len=0,
)


@dataclass(frozen=True, slots=True)
class Request:
    type: int
    rid: int
    sender: Contact
    key: bytes = b""
    record: Record | None = None


@dataclass(frozen=True, slots=True)
class Response:
    rid: int
    nodes: list[Contact] = field(default_factory=list)
    record: Record | None = None
    providers: list[Record] = field(default_factory=list)
    ok: bool = True


def _contact_wire(c: Contact) -> list:
    return [c.peer_id, list(c.addrs), c.work]


def encode_request(req: Request) -> bytes:
    m: dict = {"v": VERSION, "t": req.type, "rid": req.rid, "from": _contact_wire(req.sender)}
    if req.key:
        m["key"] = req.key
    if req.record is not None:
        m["rec"] = req.record.to_wire()
    return msgpack.packb(m, use_bin_type=True)


def encode_response(resp: Response) -> bytes:
    """Encode, dropping provider records from the tail until the message fits MAX_DHT_MESSAGE_BYTES."""
    providers = resp.providers[:MAX_PROVIDERS_RETURNED]
    while True:
        m: dict = {
            "v": VERSION,
            "t": RESPONSE,
            "rid": resp.rid,
            "ok": resp.ok,
            "nodes": [_contact_wire(c) for c in resp.nodes[:MAX_NODES]],
        }
        if resp.record is not None:
            m["rec"] = resp.record.to_wire()
        if providers:
            m["provs"] = [r.to_wire() for r in providers]
        data = msgpack.packb(m, use_bin_type=True)
        if len(data) <= MAX_DHT_MESSAGE_BYTES or not providers:
            return data
        providers = providers[: len(providers) // 2]


def _unpack(data: bytes) -> dict:
    if len(data) > MAX_DHT_MESSAGE_BYTES:
        raise InvalidMessage(f"DHT message of {len(data)} bytes exceeds {MAX_DHT_MESSAGE_BYTES}; dropped")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise InvalidMessage(f"DHT message is not bounded msgpack ({e}); dropped") from e
    if not isinstance(m, dict) or m.get("v") != VERSION:
        raise InvalidMessage(f"DHT message is not a version-{VERSION} map; dropped")
    rid = m.get("rid")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_RID:
        raise InvalidMessage("DHT message has no valid request id; dropped")
    return m


def _contact(obj: object, work_bits: int) -> Contact:
    if not (isinstance(obj, list) and len(obj) == 3):
        raise InvalidMessage("DHT contact is not [peer_id, addrs, work]; dropped")
    pid, addrs, work = obj
    if not (isinstance(pid, bytes) and 0 < len(pid) <= MAX_PEER_ID):
        raise InvalidMessage("DHT contact has a bad peer id; dropped")
    if not valid_nonce(work):
        raise InvalidMessage("DHT contact has a bad identity-work nonce; dropped")
    if not meets(b58encode(pid), work, work_bits):
        raise InvalidMessage(f"DHT contact {b58encode(pid)} lacks {work_bits} bits of identity work; dropped")
    if not (
        isinstance(addrs, list)
        and len(addrs) <= MAX_ADDRS
        and all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN for a in addrs)
    ):
        raise InvalidMessage("DHT contact has bad addresses; dropped")
    return Contact.of(pid, addrs, work)


def _record(obj: object) -> Record:
    try:
        return Record.from_wire(obj)
    except InvalidRecord as e:
        raise InvalidMessage(str(e)) from e


def decode_request(data: bytes, work_bits: int = 0) -> Request:
    """The request in `data`; InvalidMessage if anything is off, its sender's identity work included."""
    m = _unpack(data)
    t = m.get("t")
    if t not in REQUEST_TYPES:
        raise InvalidMessage(f"DHT request type {t!r} is unknown; dropped")
    sender = _contact(m.get("from"), work_bits)
    key = m.get("key", b"")
    if t in (FIND_NODE, FIND_VALUE, GET_PROVIDERS) and not (isinstance(key, bytes) and len(key) == KEY_BYTES):
        raise InvalidMessage("DHT lookup request has no 32-byte key; dropped")
    rec = None
    if t in (STORE, ADD_PROVIDER):
        if "rec" not in m:
            raise InvalidMessage("DHT store request carries no record; dropped")
        rec = _record(m["rec"])
    return Request(t, m["rid"], sender, key if isinstance(key, bytes) else b"", rec)


def decode_response(data: bytes, work_bits: int = 0) -> Response:
    """The response in `data`; InvalidMessage if anything is off. A node that names a contact without
    `work_bits` of identity work is not honest (it could not have learnt it from one): the whole answer
    is dropped, not only that contact."""
    m = _unpack(data)
    if m.get("t") != RESPONSE:
        raise InvalidMessage("DHT response has the wrong type; dropped")
    nodes = m.get("nodes", [])
    provs = m.get("provs", [])
    if not isinstance(nodes, list) or not isinstance(provs, list):
        raise InvalidMessage("DHT response lists are malformed; dropped")
    rec = _record(m["rec"]) if m.get("rec") is not None else None
    ok = m.get("ok", True)
    return Response(
        m["rid"], [_contact(c, work_bits) for c in nodes], rec, [_record(r) for r in provs], ok is True
    )
