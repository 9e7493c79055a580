"""k-buckets: the closest contacts come back in XOR order; full buckets ping before they evict."""

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dht.keys import as_int, bucket_index, node_id
from shoal.dht.routing import Contact, K, RoutingTable


def contact(pid: bytes | None = None) -> Contact:
    return Contact.of(pid or os.urandom(32), ["/ip4/127.0.0.1/tcp/1"])


def same_bucket_contacts(table: RoutingTable, bucket: int, n: int) -> list[Contact]:
    out = []
    while len(out) < n:
        c = contact()
        if bucket_index(table.own, c.id) == bucket:
            out.append(c)
    return out


def test_node_id_is_sha256_of_peer_id() -> None:
    c = contact(b"peer")
    assert c.id == as_int(node_id(b"peer"))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.binary(min_size=32, max_size=32))
def test_closest_matches_brute_force(n: int, target: bytes) -> None:
    rng = random.Random(n)
    table = RoutingTable(rng.randbytes(32))
    for _ in range(n):
        table.update(Contact.of(rng.randbytes(32)), 0.0)
    key = as_int(target)
    want = sorted(table.contacts(), key=lambda c: c.id ^ key)[:K]
    assert table.closest(key) == want


def test_full_bucket_pings_oldest_and_keeps_it_when_alive() -> None:
    table = RoutingTable(b"me")
    first, *rest = same_bucket_contacts(table, 255, K + 1)
    table.update(first, 0.0)
    for c in rest[:-1]:
        assert table.update(c, 0.0) is None
    newcomer = rest[-1]
    assert table.update(newcomer, 1.0) == first  # ping the least recently seen before evicting it
    table.ping_result(first, True, 2.0)
    assert first in table and newcomer not in table


def test_dead_oldest_is_replaced_by_newest_replacement() -> None:
    table = RoutingTable(b"me")
    cs = same_bucket_contacts(table, 255, K + 2)
    for c in cs[:K]:
        table.update(c, 0.0)
    to_ping = table.update(cs[K], 1.0)
    assert table.update(cs[K + 1], 1.0) is None  # one ping at a time per bucket
    table.ping_result(to_ping, False, 2.0)
    assert to_ping not in table and cs[K + 1] in table and len(table) == K


def test_repeated_failures_evict_and_promote_replacement() -> None:
    table = RoutingTable(b"me")
    cs = same_bucket_contacts(table, 255, K + 1)
    for c in cs:
        table.update(c, 0.0)
    victim = cs[5]
    table.failed(victim)
    assert victim in table  # one lost message is not enough
    table.failed(victim)
    assert victim not in table and cs[K] in table


def test_a_failing_contact_without_replacement_is_kept() -> None:
    # Paper 4.1: a node whose link went down, or whose only contact is its bootstrap, keeps its table.
    table = RoutingTable(b"me")
    only = contact()
    table.update(only, 0.0)
    for _ in range(5):
        table.failed(only)
    assert only in table and len(table) == 1


def test_stale_buckets_and_refresh_targets() -> None:
    table = RoutingTable(b"me")
    for c in same_bucket_contacts(table, 254, 3):
        table.update(c, 0.0)
    stale = table.stale_buckets(now=10_000.0, interval=3600.0)
    assert 254 in stale and 255 not in stale
    rng = random.Random(1)
    for i in (0, 7, 254):
        assert bucket_index(table.own, table.random_id_in_bucket(i, rng)) == i
    table.touch(table.random_id_in_bucket(254, rng), 10_000.0)
    assert 254 not in table.stale_buckets(now=10_000.0, interval=3600.0)
