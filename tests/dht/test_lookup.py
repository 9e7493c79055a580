"""The iterative lookup, driven synchronously over an in-memory network of routing tables."""

import random

from shoal.dht.lookup import Lookup
from shoal.dht.routing import Contact, RoutingTable


def network(n: int, seed: int) -> dict[int, RoutingTable]:
    rng = random.Random(seed)
    tables = [RoutingTable(rng.randbytes(32)) for _ in range(n)]
    contacts = [Contact.of(t.own_peer_id) for t in tables]
    for t in tables:
        for c in rng.sample(contacts, min(60, n)):
            t.update(c, 0.0)
    return {t.own: t for t in tables}


def drive(
    lk: Lookup, tables: dict[int, RoutingTable], liars: frozenset[int] = frozenset(), dead=frozenset()
) -> None:
    liar_contacts = [Contact.of(tables[i].own_peer_id) for i in liars]
    while not lk.done:
        qs = lk.next_queries()
        assert qs, "a lookup that is not done must have something to ask"
        for c in qs:
            if c.id in dead:
                lk.on_failure(c)
            elif c.id in liars:
                lk.on_response(c, liar_contacts)  # liars only ever point at each other
            else:
                lk.on_response(c, tables[c.id].closest(lk.target), found=False)


def test_lookup_finds_the_k_closest_nodes() -> None:
    tables = network(400, 1)
    rng = random.Random(2)
    for _ in range(20):
        src = rng.choice(list(tables.values()))
        target = rng.choice(list(tables))
        lk = Lookup(target, src.closest(target), own_peer_id=src.own_peer_id)
        drive(lk, tables)
        true = sorted(tables, key=lambda i: i ^ target)[:20]
        got = [c.id for c in lk.closest()]
        assert got[0] == target
        assert len(set(got) & set(true)) >= 18


def test_lookup_routes_around_dead_nodes() -> None:
    tables = network(300, 3)
    ids = list(tables)
    rng = random.Random(4)
    target = ids[0]
    dead = set(rng.sample(ids[1:], 90))
    src = tables[ids[-1]] if ids[-1] not in dead else tables[next(i for i in ids[1:] if i not in dead)]
    lk = Lookup(target, src.closest(target), own_peer_id=src.own_peer_id)
    drive(lk, tables, dead=dead)
    assert lk.closest()[0].id == target
    assert not {c.id for c in lk.closest()} & dead


def test_disjoint_paths_survive_a_poisoned_path_that_a_single_path_does_not() -> None:
    tables = network(400, 5)
    ids = list(tables)
    rng = random.Random(6)
    survived = {1: 0, 3: 0}
    trials = 30
    for _ in range(trials):
        target = rng.choice(ids)
        liars = set(rng.sample([i for i in ids if i != target], 80))
        src = tables[rng.choice([i for i in ids if i not in liars and i != target])]
        for paths in (1, 3):
            lk = Lookup(target, src.closest(target), own_peer_id=src.own_peer_id, paths=paths)
            drive(lk, tables, liars=liars)
            survived[paths] += any(c.id == target for c in lk.closest())
    assert survived[3] > survived[1]
    assert survived[3] >= trials * 0.9


def test_value_lookup_stops_once_enough_answers_hold_the_value() -> None:
    tables = network(200, 7)
    ids = list(tables)
    target = ids[0]
    src = tables[ids[1]]
    lk = Lookup(target, src.closest(target), own_peer_id=src.own_peer_id, want=1)
    holders = set(sorted(ids, key=lambda i: i ^ target)[:20])
    while not lk.done:
        for c in lk.next_queries():
            lk.on_response(c, tables[c.id].closest(target), found=c.id in holders)
    assert lk.found >= 1 and lk.hops() >= 1
    assert lk.next_queries() == []


def test_answers_not_asked_for_are_ignored() -> None:
    tables = network(50, 8)
    ids = list(tables)
    lk = Lookup(ids[0], tables[ids[1]].closest(ids[0]), own_peer_id=tables[ids[1]].own_peer_id)
    stranger = Contact.of(b"stranger")
    lk.on_response(stranger, [Contact.of(b"x")], found=True)
    assert lk.found == 0 and lk.messages == 0
