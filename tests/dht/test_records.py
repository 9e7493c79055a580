"""Signed records and the store: only records that verify and fit the limits are kept."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.errors import InvalidRecord, QuotaExceeded
from shoal.dht.keys import record_key, run_key
from shoal.dht.records import MAX_TTL_S, MAX_VALUE, PROVIDER, Record, RecordStore, public_bytes, subnet_of

NOW = 1_000_000.0


def value(key: Ed25519PrivateKey, seq: int = 1, name: bytes = b"n", data: bytes = b"v") -> Record:
    return Record.value_record(key, name, data, seq, NOW + 600)


def test_signed_record_roundtrips_and_verifies() -> None:
    k = Ed25519PrivateKey.generate()
    r = value(k)
    assert r.key == record_key(public_bytes(k), b"n")
    back = Record.from_wire(r.to_wire())
    assert back == r
    back.verify(NOW)


def test_tampered_value_or_wrong_signer_is_refused() -> None:
    k, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    r = value(k)
    tampered = Record(r.kind, r.key, r.publisher, r.seq, r.expires, r.name, b"evil", r.addrs, r.sig)
    with pytest.raises(InvalidRecord):
        tampered.verify(NOW)
    # Signed by someone else but claiming k's key: the key binding and signature both fail.
    forged = Record.value_record(other, b"n", b"v", 1, NOW + 600)
    stolen = Record(forged.kind, r.key, forged.publisher, 1, forged.expires, b"n", b"v", (), forged.sig)
    with pytest.raises(InvalidRecord):
        stolen.verify(NOW)
    unsigned = Record(r.kind, r.key, r.publisher, r.seq, r.expires, r.name, r.value, r.addrs, bytes(64))
    with pytest.raises(InvalidRecord):
        unsigned.verify(NOW)


def test_expired_and_too_long_lived_records_are_refused() -> None:
    k = Ed25519PrivateKey.generate()
    with pytest.raises(InvalidRecord, match="expired"):
        Record.value_record(k, b"n", b"v", 1, NOW - 1).verify(NOW)
    with pytest.raises(InvalidRecord, match="longer"):
        Record.value_record(k, b"n", b"v", 1, NOW + 2 * MAX_TTL_S).verify(NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w[:8],  # missing field
        lambda w: [7, *w[1:]],  # unknown kind
        lambda w: [w[0], w[1] + b"x", *w[2:]],  # key of the wrong size
        lambda w: [*w[:6], b"x" * (MAX_VALUE + 1), *w[7:]],  # oversized value
        lambda w: [*w[:3], -1, *w[4:]],  # negative seq
        lambda w: [*w[:7], ["/ip4/1.2.3.4"] * 100, w[8]],  # too many addresses
        lambda w: [*w[:8], b"short"],  # bad signature size
        lambda w: "not a list",
    ],
)
def test_malformed_records_are_refused(mutate) -> None:
    r = value(Ed25519PrivateKey.generate())
    with pytest.raises(InvalidRecord):
        Record.from_wire(mutate(r.to_wire()))


def test_store_keeps_newest_seq_and_refuses_replays() -> None:
    k = Ed25519PrivateKey.generate()
    pub = public_bytes(k)
    store = RecordStore()
    assert store.put(value(k, seq=2, data=b"new"), pub, "10.0.0.1", NOW)
    assert not store.put(value(k, seq=1, data=b"old"), pub, "10.0.0.1", NOW)
    got = store.get_value(record_key(pub, b"n"), NOW)
    assert got is not None and got.value == b"new"
    assert len(store) == 1


def test_store_never_keeps_a_bad_record() -> None:
    k = Ed25519PrivateKey.generate()
    r = value(k)
    bad = Record(r.kind, r.key, r.publisher, r.seq, r.expires, r.name, b"evil", r.addrs, r.sig)
    store = RecordStore()
    with pytest.raises(InvalidRecord):
        store.put(bad, r.publisher, "10.0.0.1", NOW)
    assert len(store) == 0
    assert store.get_value(r.key, NOW) is None


def test_store_quota_per_peer_and_per_subnet() -> None:
    store = RecordStore(capacity=64)  # 1/16 per peer = 4 records, 1/4 per /24 = 16 records
    k = Ed25519PrivateKey.generate()
    pub = public_bytes(k)
    for i in range(4):
        assert store.put(value(k, name=b"n%d" % i), pub, "10.0.0.1", NOW)
    with pytest.raises(QuotaExceeded, match="peer"):
        store.put(value(k, name=b"n4"), pub, "10.0.0.1", NOW)
    # Many peers from one /24: the subnet's share caps them together.
    keys = [Ed25519PrivateKey.generate() for _ in range(20)]
    for j, kk in enumerate(keys):
        if j < 3:
            assert store.put(value(kk), public_bytes(kk), f"10.0.0.{j + 2}", NOW)
    for kk in keys[3:]:
        r = value(kk)
        try:
            store.put(r, public_bytes(kk), "10.0.0.99", NOW)
        except QuotaExceeded as e:
            assert "subnet 10.0.0.0/24" in str(e)
            break
    else:
        pytest.fail("one /24 filled more than its share of the store")
    # Another /24 is still welcome.
    fresh = Ed25519PrivateKey.generate()
    assert store.put(value(fresh), public_bytes(fresh), "10.0.1.1", NOW)


def test_provider_withdrawal_hides_the_provider() -> None:
    k = Ed25519PrivateKey.generate()
    pub = public_bytes(k)
    key = run_key("run-a")
    store = RecordStore()
    store.put(Record.provider_record(k, key, ["/ip4/1.2.3.4/tcp/1"], 1, NOW + 600), pub, "1.2.3.4", NOW)
    assert [r.publisher for r in store.get_providers(key, NOW, 10)] == [pub]
    store.put(Record.provider_record(k, key, [], 2, NOW + 600), pub, "1.2.3.4", NOW)
    assert store.get_providers(key, NOW, 10) == []
    assert store.get_providers(key, NOW, 10) == [] and store.expire(NOW + 601) == 1


def test_subnet_of() -> None:
    assert subnet_of("192.168.7.9") == "192.168.7.0/24"
    assert subnet_of("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert PROVIDER == 1
