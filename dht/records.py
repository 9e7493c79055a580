"""Signed, expiring DHT records and the bounded store that keeps them.

Two kinds share one shape. A VALUE record lives at ``record_key(publisher, name)``, so only its
publisher can write there. A PROVIDER record says "peer P serves key K at these addresses"; the
peers of a run announce themselves that way under ``run_key(run_id)``, and an empty address list
is a signed withdrawal. Every record carries its publisher's Ed25519 signature, a sequence number
(higher replaces lower, so an old copy cannot be replayed over a newer one) and an expiry.

A publisher is named by its libp2p PeerID (the multihash bytes, `transport.identity`); its public key
is inlined there (identity multihash, as for every Ed25519 key), so a record carries all it needs to be
checked.
"""

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.errors import InvalidRecord, QuotaExceeded
from shoal.dht.keys import KEY_BYTES, record_key, short
from shoal.transport.errors import ProtocolError
from shoal.transport.identity import PeerID, peer_id_from_key

log = logging.getLogger(__name__)

VALUE = 0
PROVIDER = 1

MAX_PUBLISHER = 64  # a PeerID multihash: 38 bytes for Ed25519, 34 for a hashed key
SIG_BYTES = 64  # Ed25519 signature
MAX_NAME = 128  # a record name is a label, not data
MAX_VALUE = 4096  # DHT values are small pointers (addresses, hashes); bulk data travels point to point
MAX_ADDRS = 8  # direct + a few relayed addresses per provider
MAX_ADDR_LEN = 256  # a multiaddr with a relay circuit fits in well under this
MAX_TTL_S = 24 * 3600.0  # a record outlives its publisher by at most a day (libp2p's provider TTL is 48 h)
CLOCK_SKEW_S = 300.0  # tolerated clock difference between publisher and holder
MAX_SEQ = 2**63 - 1

MAX_RECORDS = 16384  # whole store: ~16k records of <= ~6 KiB stays under 100 MiB even if all are full
PEER_SHARE = 1 / 16  # no single peer may fill more than this share of the store ...
SUBNET_SHARE = 1 / 4  # ... nor one /24 (or IPv6 /48), the usual cost unit of a Sybil attacker
MAX_PROVIDERS_PER_KEY = 1024  # a run with more peers than this is found through a sample of them

_SIG_TAG = b"shoal/dht/record-sig/v1\x00"


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The publisher id of a private key: its PeerID's multihash bytes."""
    return peer_id_from_key(key).multihash


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    key: bytes
    publisher: bytes
    seq: int
    expires: float
    name: bytes = b""
    value: bytes = b""
    addrs: tuple[str, ...] = ()
    sig: bytes = b""

    def _signed_bytes(self) -> bytes:
        """What the signature covers: every wire field but the signature itself."""
        return _SIG_TAG + msgpack.packb(self.to_wire()[:-1], use_bin_type=True)

    @staticmethod
    def value_record(key: Ed25519PrivateKey, name: bytes, value: bytes, seq: int, expires: float) -> "Record":
        pub = public_bytes(key)
        r = Record(VALUE, record_key(pub, name), pub, seq, float(expires), name=name, value=value)
        return _signed(r, key)

    @staticmethod
    def provider_record(
        key: Ed25519PrivateKey, at: bytes, addrs: list[str] | tuple[str, ...], seq: int, expires: float
    ) -> "Record":
        r = Record(PROVIDER, at, public_bytes(key), seq, float(expires), addrs=tuple(addrs))
        return _signed(r, key)

    def to_wire(self) -> list:
        return [
            self.kind,
            self.key,
            self.publisher,
            self.seq,
            self.expires,
            self.name,
            self.value,
            list(self.addrs),
            self.sig,
        ]

    @staticmethod
    def from_wire(obj: object) -> "Record":
        """Parse a record from decoded msgpack, checking every type and size (not the signature)."""
        if not isinstance(obj, list) or len(obj) != 9:
            raise InvalidRecord("DHT record is not a 9-field list; dropped")
        kind, key, pub, seq, expires, name, value, addrs, sig = obj
        ok = (
            kind in (VALUE, PROVIDER)
            and _is_bytes(key, KEY_BYTES, KEY_BYTES)
            and _is_bytes(pub, 2, MAX_PUBLISHER)
            and isinstance(seq, int)
            and not isinstance(seq, bool)
            and 0 <= seq <= MAX_SEQ
            and isinstance(expires, (int, float))
            and not isinstance(expires, bool)
            and _is_bytes(name, 0, MAX_NAME)
            and _is_bytes(value, 0, MAX_VALUE)
            and isinstance(addrs, list)
            and len(addrs) <= MAX_ADDRS
            and all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN for a in addrs)
            and _is_bytes(sig, SIG_BYTES, SIG_BYTES)
        )
        if not ok:
            raise InvalidRecord("DHT record has a field of the wrong type or size; dropped")
        return Record(kind, key, pub, seq, float(expires), name, value, tuple(addrs), sig)

    def verify(self, now: float) -> None:
        """Raise InvalidRecord unless the record is well-bound, unexpired, not too long-lived and signed."""
        if self.expires <= now:
            raise InvalidRecord(f"DHT record from {short(self.publisher)} expired; dropped")
        if self.expires > now + MAX_TTL_S + CLOCK_SKEW_S:
            raise InvalidRecord(
                f"DHT record from {short(self.publisher)} lives longer than {MAX_TTL_S:.0f} s; dropped"
            )
        if self.kind == VALUE and self.key != record_key(self.publisher, self.name):
            raise InvalidRecord("DHT value record's key is not bound to its publisher and name; dropped")
        if self.kind == PROVIDER and (self.name or self.value):
            raise InvalidRecord("DHT provider record carries a name or value; dropped")
        if self.kind == VALUE and self.addrs:
            raise InvalidRecord("DHT value record carries addresses; dropped")
        try:
            key = PeerID.from_bytes(self.publisher).public_key()
        except (ProtocolError, ValueError) as e:
            raise InvalidRecord(f"DHT record's publisher id is not a valid PeerID ({e}); dropped") from e
        if key is None:
            raise InvalidRecord("DHT record's publisher id does not inline its public key; dropped")
        if not key.verify(self.sig, self._signed_bytes()):
            raise InvalidRecord(
                f"DHT record from {short(self.publisher)} is not signed by its publisher; dropped"
            )


def _signed(r: Record, key: Ed25519PrivateKey) -> Record:
    return Record(
        r.kind, r.key, r.publisher, r.seq, r.expires, r.name, r.value, r.addrs, key.sign(r._signed_bytes())
    )


def _is_bytes(x: object, lo: int, hi: int) -> bool:
    return isinstance(x, bytes) and lo <= len(x) <= hi


def subnet_of(ip: str) -> str:
    """The cost unit of an address for quotas: its /24 (IPv4) or /48 (IPv6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    bits = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


class RecordStore:
    """Records held for others, bounded in total, per sending peer and per sending /24."""

    def __init__(self, capacity: int = MAX_RECORDS) -> None:
        self.capacity = capacity
        self._records: dict[tuple[bytes, bytes], tuple[Record, bytes, str]] = {}  # (key, pub) -> rec, origin
        self._providers: dict[bytes, set[bytes]] = {}  # key -> publishers holding a slot there
        self._by_peer: Counter[bytes] = Counter()
        self._by_subnet: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._records)

    def put(self, rec: Record, sender: bytes, sender_ip: str, now: float) -> bool:
        """Verify and store `rec` sent by peer `sender` from `sender_ip`.

        Returns False for a stale copy (a newer or equal seq is held); raises InvalidRecord or
        QuotaExceeded when the record must be refused.
        """
        rec.verify(now)
        slot = (rec.key, rec.publisher)
        old = self._records.get(slot)
        if old is not None and old[0].seq >= rec.seq:
            return old[0] == rec
        subnet = subnet_of(sender_ip)
        if old is None:
            if len(self._records) >= self.capacity:
                self.expire(now)  # only when full: a sweep is O(n), the driver sweeps periodically too
            if len(self._records) >= self.capacity:
                raise QuotaExceeded(
                    f"DHT store is full ({self.capacity} records); record from "
                    f"{short(sender)} refused, retry elsewhere"
                )
            if self._by_peer[sender] >= int(self.capacity * PEER_SHARE):
                raise QuotaExceeded(
                    f"peer {short(sender)} already holds {PEER_SHARE:.0%} of this DHT store; record refused"
                )
            if self._by_subnet[subnet] >= int(self.capacity * SUBNET_SHARE):
                raise QuotaExceeded(
                    f"subnet {subnet} already holds {SUBNET_SHARE:.0%} of this DHT store; record refused"
                )
            provs = self._providers.get(rec.key, ())
            if rec.kind == PROVIDER and len(provs) >= MAX_PROVIDERS_PER_KEY:
                raise QuotaExceeded(
                    f"key {rec.key.hex()[:16]} already has {MAX_PROVIDERS_PER_KEY} providers; record refused"
                )
        else:
            self._forget_origin(old[1], old[2])
        self._records[slot] = (rec, sender, subnet)
        self._by_peer[sender] += 1
        self._by_subnet[subnet] += 1
        self._providers.setdefault(rec.key, set()).add(rec.publisher)
        return True

    def _forget_origin(self, sender: bytes, subnet: str) -> None:
        self._by_peer[sender] -= 1
        if self._by_peer[sender] <= 0:
            del self._by_peer[sender]
        self._by_subnet[subnet] -= 1
        if self._by_subnet[subnet] <= 0:
            del self._by_subnet[subnet]

    def _drop(self, slot: tuple[bytes, bytes]) -> None:
        rec, sender, subnet = self._records.pop(slot)
        self._forget_origin(sender, subnet)
        pubs = self._providers.get(rec.key)
        if pubs is not None:
            pubs.discard(rec.publisher)
            if not pubs:
                del self._providers[rec.key]

    def get_value(self, key: bytes, now: float) -> Record | None:
        """The unexpired value record at `key` (value keys have exactly one possible publisher)."""
        for pub in self._providers.get(key, ()):
            rec = self._records[(key, pub)][0]
            if rec.kind == VALUE and rec.expires > now:
                return rec
        return None

    def get_providers(self, key: bytes, now: float, limit: int, withdrawals: bool = False) -> list[Record]:
        """Up to `limit` unexpired provider records at `key`, the freshest first.

        Withdrawals (records without addresses) are left out unless `withdrawals`; then they follow the
        live records, so that a lookup can let a newer withdrawal beat an older announcement held
        elsewhere.
        """
        recs = [self._records[(key, pub)][0] for pub in self._providers.get(key, ())]
        recs = [r for r in recs if r.kind == PROVIDER and r.expires > now and (withdrawals or r.addrs)]
        recs.sort(key=lambda r: (bool(r.addrs), r.expires), reverse=True)
        return recs[:limit]

    def expire(self, now: float) -> int:
        """Drop expired records; returns how many."""
        dead = [slot for slot, (r, _, _) in self._records.items() if r.expires <= now]
        for slot in dead:
            self._drop(slot)
        return len(dead)
