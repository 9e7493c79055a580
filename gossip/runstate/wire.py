"""Sync messages: msgpack maps with a version field, decoded under explicit limits.

    ae    {"v": 1, "t": "ae", "dh": 16 B, "rh": 16 B}        hashes of my document and record digests
    sv    {"v": 1, "t": "sv", "d": blob|nil, "p": blob|nil, "r": blob|nil, "x": bool}
          full digests (the state vector: per document (kind, owner, generation, seq, head)); "x" asks
          the receiver to answer with its own digests when it lacks something
    push  {"v": 1, "t": "push", "e": [entry], "r": [record], "q": [[entry, entry]], "g": bool}
          signed items; "g" marks a rumour, which a receiver forwards when it learns something new

Digests are fixed-width blobs sorted by key, so their size is checked before they are read.
"""

import struct
from dataclasses import dataclass
from typing import Any, overload

import msgpack

from .errors import Rejected
from .limits import MAX_ARRAY_LEN, MAX_DOCUMENTS, MAX_ITEMS_PER_PUSH, MAX_MAP_LEN, MAX_SYNC_MESSAGE_BYTES

VERSION = 1
KEY_ID_BYTES = 8  # owners are named by 8 bytes of their key in digests: a second preimage costs 2**64
# kind u8, owner id, generation u64, seq u32, head id (8 bytes of the last entry's id)
DOC_ITEM = struct.Struct(f">B{KEY_ID_BYTES}sQI8s")
REC_ITEM = struct.Struct(f">{KEY_ID_BYTES}sQ")  # owner id, counter
PROOF_ITEM = struct.Struct(f">{KEY_ID_BYTES}s")


@dataclass(frozen=True, slots=True)
class AntiEntropy:
    docs_hash: bytes
    records_hash: bytes


@dataclass(frozen=True, slots=True)
class Digest:
    # Decoded: lists; to encode, lists or the packed blobs themselves.
    docs: list[tuple[int, bytes, int, int, bytes]] | bytes | None
    proofs: list[bytes] | bytes | None
    records: list[tuple[bytes, int]] | bytes | None
    want_reply: bool


@dataclass(frozen=True, slots=True)
class Push:
    entries: list[bytes]
    records: list[bytes]
    proofs: list[tuple[bytes, bytes]]
    rumour: bool


Message = AntiEntropy | Digest | Push


def encode(msg: Message) -> bytes:
    if isinstance(msg, AntiEntropy):
        body: dict[str, Any] = {"t": "ae", "dh": msg.docs_hash, "rh": msg.records_hash}
    elif isinstance(msg, Digest):
        body = {
            "t": "sv",
            "d": _pack(msg.docs, DOC_ITEM),
            "p": _pack(msg.proofs, PROOF_ITEM),
            "r": _pack(msg.records, REC_ITEM),
            "x": msg.want_reply,
        }
    else:
        body = {
            "t": "push",
            "e": msg.entries,
            "r": msg.records,
            "q": [list(p) for p in msg.proofs],
            "g": msg.rumour,
        }
    body["v"] = VERSION
    return msgpack.packb(body)


@overload
def _pack(items: None, item: struct.Struct) -> None: ...
@overload
def _pack(items: bytes | list[Any], item: struct.Struct) -> bytes: ...
def _pack(items: bytes | list[Any] | None, item: struct.Struct) -> bytes | None:
    """A digest as sent: None, an already packed blob (a sender caches its own), or a list of tuples."""
    if items is None or isinstance(items, bytes):
        return items
    return b"".join(item.pack(*(x if isinstance(x, tuple) else (x,))) for x in items)


def _blob(v: Any, item: struct.Struct, what: str) -> list[tuple] | None:
    if v is None:
        return None
    if type(v) is not bytes or len(v) % item.size or len(v) > item.size * MAX_DOCUMENTS:
        raise Rejected(f"{what} digest is not a whole number of {item.size}-byte items; dropped")
    return list(item.iter_unpack(v))


def _bin_list(v: Any, what: str) -> list[bytes]:
    if type(v) is not list or len(v) > MAX_ITEMS_PER_PUSH or any(type(x) is not bytes for x in v):
        raise Rejected(f"push {what} must be a list of at most {MAX_ITEMS_PER_PUSH} byte strings; dropped")
    return v


def decode(data: bytes) -> Message:
    if len(data) > MAX_SYNC_MESSAGE_BYTES:
        raise Rejected(f"sync message of {len(data)} bytes exceeds {MAX_SYNC_MESSAGE_BYTES}; dropped")
    try:
        m = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_SYNC_MESSAGE_BYTES,
            max_str_len=16,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise Rejected(f"sync message is not valid msgpack ({exc}); dropped") from exc
    if type(m) is not dict or m.get("v") != VERSION:
        raise Rejected("sync message is not a version-1 map; dropped")
    t = m.get("t")
    if t == "ae":
        dh, rh = m.get("dh"), m.get("rh")
        if type(dh) is not bytes or type(rh) is not bytes or len(dh) != 16 or len(rh) != 16:
            raise Rejected("anti-entropy message needs two 16-byte hashes; dropped")
        return AntiEntropy(dh, rh)
    if t == "sv":
        docs = _blob(m.get("d"), DOC_ITEM, "document")
        proofs = _blob(m.get("p"), PROOF_ITEM, "proof")
        recs = _blob(m.get("r"), REC_ITEM, "record")
        return Digest(docs, None if proofs is None else [p[0] for p in proofs], recs, m.get("x") is True)
    if t == "push":
        proofs = m.get("q", [])
        if (
            type(proofs) is not list
            or len(proofs) > MAX_ITEMS_PER_PUSH
            or any(type(p) is not list or len(p) != 2 or any(type(x) is not bytes for x in p) for p in proofs)
        ):
            raise Rejected("push proofs must be pairs of entries; dropped")
        entries = _bin_list(m.get("e", []), "entries")
        records = _bin_list(m.get("r", []), "records")
        if len(entries) + len(records) + 2 * len(proofs) > MAX_ITEMS_PER_PUSH:
            raise Rejected(f"push carries more than {MAX_ITEMS_PER_PUSH} items; dropped")
        return Push(entries, records, [(a, b) for a, b in proofs], m.get("g") is True)
    raise Rejected(f"sync message has unknown type {t!r}; dropped")
