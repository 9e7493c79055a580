"""Signed envelopes: document entries (Yjs updates) and ephemeral records (heartbeats).

Every byte of run state that travels is inside one of these, signed with its writer's Ed25519 key
(`cryptography` directly; the key's 32 raw public bytes name the writer). Signatures cover a domain tag
and the run id, so nothing signed for one run or one purpose can be replayed as another.

An `Entry` is one link of an owner's chain for one document: (kind, owner, generation, seq). Seq 0 of a
generation is a snapshot (the whole document rebuilt under a fresh Yjs client id); seq n > 0 is the
update of one local transaction, and names the id of entry n - 1 (`prev`), so two different entries for
the same slot are a signed proof that the owner equivocated.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import Rejected
from .limits import MAX_ENTRY_BYTES, MAX_RECORD_BYTES, MAX_VALUE_DEPTH

VERSION = 1
KEY_BYTES = 32
SIG_BYTES = 64
ID_BYTES = 16  # entry ids: collisions need 2**64 work, and only the owner can sign either side
KIND_PEER = 0  # a peer's own document: membership, addresses, round, bans and votes
KIND_RUN = 1  # a run document: configuration and checkpoint manifest, written by the creator or a delegate
KINDS = (KIND_PEER, KIND_RUN)
_ENTRY_TAG = b"shoal/runstate/entry/v1\x00"
_RECORD_TAG = b"shoal/runstate/record/v1\x00"
_MAX_GEN = (1 << 63) - 1


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def client_id(owner: bytes, gen: int) -> int:
    """The Yjs client id of `owner`'s writer in generation `gen`: bound to the key and the process epoch.

    53 bits so that it survives JavaScript peers and pycrdt's integer handling.
    """
    h = hashlib.blake2b(owner + gen.to_bytes(8, "big"), digest_size=8, person=b"shoal-yjs-client").digest()
    return int.from_bytes(h, "big") >> 11


def _unpack(data: bytes, limit: int, what: str) -> Any:
    if len(data) > limit:
        raise Rejected(f"{what} of {len(data)} bytes exceeds the {limit}-byte limit; dropped")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise Rejected(f"{what} is not valid msgpack ({exc}); dropped") from exc


def _verify(owner: bytes, sig: bytes, message: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(owner).verify(sig, message)
    except (InvalidSignature, ValueError) as exc:
        raise Rejected(f"{what} from {owner.hex()[:16]} has a bad signature; dropped") from exc


def _check_int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise Rejected(f"{what} must be an integer in [{lo}, {hi}], got {v!r}; dropped")
    return v


def _check_bytes(v: Any, n: int | None, what: str) -> bytes:
    if type(v) is not bytes or (n is not None and len(v) != n):
        raise Rejected(f"{what} must be {n} bytes; dropped")
    return v


@dataclass(frozen=True, slots=True)
class Entry:
    kind: int
    owner: bytes
    gen: int
    seq: int
    prev: bytes  # id of entry seq - 1, empty for seq 0
    update: bytes  # Yjs v1 update
    sig: bytes

    @property
    def slot(self) -> tuple[int, bytes, int, int]:
        return (self.kind, self.owner, self.gen, self.seq)

    def signed_part(self, run_id: bytes) -> bytes:
        body = msgpack.packb([self.kind, self.owner, self.gen, self.seq, self.prev, self.update])
        return _ENTRY_TAG + len(run_id).to_bytes(1, "big") + run_id + body

    def id(self, run_id: bytes) -> bytes:
        return hashlib.blake2b(self.signed_part(run_id), digest_size=ID_BYTES).digest()

    def encode(self) -> bytes:
        return msgpack.packb(
            [VERSION, self.kind, self.owner, self.gen, self.seq, self.prev, self.update, self.sig]
        )

    @classmethod
    def sign(
        cls, key: Ed25519PrivateKey, run_id: bytes, kind: int, gen: int, seq: int, prev: bytes, update: bytes
    ) -> "Entry":
        unsigned = cls(kind, public_bytes(key), gen, seq, prev, update, b"")
        return cls(kind, unsigned.owner, gen, seq, prev, update, key.sign(unsigned.signed_part(run_id)))

    @classmethod
    def decode(cls, data: bytes, run_id: bytes, *, verify: bool = True) -> "Entry":
        """Decode and (unless `verify=False`, for a caller that checks for duplicates first and then
        calls `verify`) check the signature; the caller still checks authorization and the update."""
        v = _unpack(data, MAX_ENTRY_BYTES, "document entry")
        if type(v) is not list or len(v) != 8 or v[0] != VERSION:
            raise Rejected("document entry is not an 8-field version-1 list; dropped")
        _, kind, owner, gen, seq, prev, update, sig = v
        if kind not in KINDS:
            raise Rejected(f"document entry names unknown document kind {kind!r}; dropped")
        entry = cls(
            kind,
            _check_bytes(owner, KEY_BYTES, "entry owner"),
            _check_int(gen, 0, _MAX_GEN, "entry generation"),
            _check_int(seq, 0, _MAX_GEN, "entry seq"),
            _check_bytes(prev, 0 if seq == 0 else ID_BYTES, "entry prev"),
            _check_bytes(update, None, "update"),
            _check_bytes(sig, SIG_BYTES, "entry signature"),
        )
        if verify:
            entry.verify(run_id)
        return entry

    def verify(self, run_id: bytes) -> None:
        _verify(self.owner, self.sig, self.signed_part(run_id), "document entry")


def _check_value(v: Any, depth: int = 0) -> None:
    """Records hold plain numbers, strings, bools, None and small lists/maps of those."""
    if depth > MAX_VALUE_DEPTH:
        raise Rejected("record value nests too deep; dropped")
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise Rejected("record holds a non-finite number; dropped")
    elif isinstance(v, list):
        for x in v:
            _check_value(x, depth + 1)
    elif isinstance(v, dict):
        for x in v.values():
            _check_value(x, depth + 1)
    elif not (v is None or isinstance(v, (bool, int, str))):
        raise Rejected(f"record holds a value of type {type(v).__name__}; dropped")


@dataclass(frozen=True, slots=True)
class MetricsRecord:
    """A fast-changing per-peer value (heartbeat, throughput, loss): newest counter wins."""

    owner: bytes
    counter: int
    data: dict[str, Any]
    sig: bytes

    def signed_part(self, run_id: bytes) -> bytes:
        body = msgpack.packb([self.owner, self.counter, self.data])
        return _RECORD_TAG + len(run_id).to_bytes(1, "big") + run_id + body

    def encode(self) -> bytes:
        return msgpack.packb([VERSION, self.owner, self.counter, self.data, self.sig])

    @classmethod
    def sign(
        cls, key: Ed25519PrivateKey, run_id: bytes, counter: int, data: dict[str, Any]
    ) -> "MetricsRecord":
        _check_value(data)
        unsigned = cls(public_bytes(key), counter, data, b"")
        rec = cls(unsigned.owner, counter, data, key.sign(unsigned.signed_part(run_id)))
        if len(rec.encode()) > MAX_RECORD_BYTES:
            raise Rejected(f"record of {len(rec.encode())} bytes exceeds {MAX_RECORD_BYTES}; keep it small")
        return rec

    @classmethod
    def decode(cls, data: bytes, run_id: bytes, *, verify: bool = True) -> "MetricsRecord":
        v = _unpack(data, MAX_RECORD_BYTES, "record")
        if type(v) is not list or len(v) != 5 or v[0] != VERSION or type(v[3]) is not dict:
            raise Rejected("record is not a 5-field version-1 list with a map; dropped")
        _, owner, counter, payload, sig = v
        _check_value(payload)
        rec = cls(
            _check_bytes(owner, KEY_BYTES, "record owner"),
            _check_int(counter, 0, _MAX_GEN, "counter"),
            payload,
            _check_bytes(sig, SIG_BYTES, "record signature"),
        )
        if verify:
            rec.verify(run_id)
        return rec

    def verify(self, run_id: bytes) -> None:
        _verify(self.owner, self.sig, self.signed_part(run_id), "record")
