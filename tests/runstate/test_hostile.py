"""Forged, foreign-key, oversized and malformed input never changes a replica's state."""

import random

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text

from shoal.gossip.runstate import KIND_PEER, KIND_RUN, Rejected, RunStateError, public_bytes, wire
from shoal.gossip.runstate.docs import DocReplica
from shoal.gossip.runstate.envelope import Entry, MetricsRecord, client_id
from shoal.gossip.runstate.limits import MAX_ENTRY_BYTES, MAX_STRIKES, MAX_SYNC_MESSAGE_BYTES
from shoal.gossip.runstate.sim import Swarm, fingerprint

ATTACKER = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
ATTACKER_PK = public_bytes(ATTACKER)


def settled_swarm() -> Swarm:
    s = Swarm(3, seed=11)
    s.do(0, s.states[0].set_config({"lr": 0.5}))
    s.do(0, s.states[0].add_checkpoint("aa" * 32, 5, 10, []))
    for i, x in enumerate(s.states):
        s.do(i, x.set_member(addrs=[f"/ip4/10.1.0.{i}/tcp/1"]))
    assert s.settle()
    return s


SWARM = settled_swarm()


def push(entries=(), records=(), proofs=()) -> bytes:
    return wire.encode(wire.Push(list(entries), list(records), list(proofs), True))


def update_from(client: int, fill) -> bytes:
    doc = Doc(client_id=client)
    roots = {name: doc.get(name, type=Map) for name in ("member", "bans", "votes", "config")}
    captured = []
    doc.observe(lambda e: captured.append(e.update))
    with doc.transaction():
        fill(doc, roots)
    return captured[0]


def assert_unchanged(data: bytes) -> None:
    victim = SWARM.states[1]
    before = fingerprint(victim, SWARM.now)
    # A new sender each time, so that no input is skipped because an earlier one got its sender dropped.
    victim.on_message(random.randbytes(32), data, SWARM.now)
    assert fingerprint(victim, SWARM.now) == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_change_nothing(data):
    assert_unchanged(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=5), st.lists(st.binary(max_size=300), max_size=5))
def test_random_items_in_a_valid_push_change_nothing(entries, records):
    assert_unchanged(push(entries, records))


def test_forged_entries_change_nothing():
    creator = SWARM.states[0]
    real = creator.docs[(KIND_RUN, creator.me)].entries[-1]
    # The creator's entry with its update swapped: the signature no longer covers it.
    evil_update = update_from(
        real.owner and client_id(creator.me, real.gen),
        lambda d, r: r["config"].__setitem__("lr", {"v": 99, "rev": 9}),
    )
    swapped = Entry(
        real.kind, real.owner, real.gen, real.seq + 1, real.id(SWARM.run_id), evil_update, real.sig
    )
    # The same content signed by the attacker but claiming the creator as owner.
    claimed = Entry.sign(
        ATTACKER, SWARM.run_id, KIND_RUN, real.gen, real.seq + 1, real.id(SWARM.run_id), evil_update
    )
    claimed = Entry(
        claimed.kind, creator.me, claimed.gen, claimed.seq, claimed.prev, claimed.update, claimed.sig
    )
    # A real entry replayed from another run.
    other_run = Entry.sign(
        creator.key, b"other-run", KIND_RUN, real.gen, real.seq + 1, real.id(SWARM.run_id), evil_update
    )
    for e in (swapped, claimed, other_run):
        assert_unchanged(push([e.encode()]))
    rec = MetricsRecord.sign(creator.key, SWARM.run_id, 10**15, {"loss": 0.0})
    forged = MetricsRecord(rec.owner, rec.counter + 1, rec.data, rec.sig)
    assert_unchanged(push(records=[forged.encode()]))


def test_foreign_key_entries_change_nothing():
    gen = 1
    cid = client_id(ATTACKER_PK, gen)
    # A run document from a key the creator never named.
    run_doc = update_from(cid, lambda d, r: r["config"].__setitem__("lr", {"v": 1, "rev": 99}))
    assert_unchanged(push([Entry.sign(ATTACKER, SWARM.run_id, KIND_RUN, gen, 0, b"", run_doc).encode()]))
    victim_pk = SWARM.states[2].me
    victim_doc = SWARM.states[1].docs[(KIND_PEER, victim_pk)]
    bad_updates = [
        # its own document, written under the victim's Yjs client id
        update_from(client_id(victim_pk, victim_doc.gen), lambda d, r: r["member"].__setitem__("round", 1)),
        # a root a peer document does not have
        update_from(cid, lambda d, r: r["config"].__setitem__("lr", 1)),
        # a nested shared type and a text
        update_from(cid, lambda d, r: r["member"].__setitem__("x", Map({"a": 1}))),
        update_from(cid, lambda d, r: d.get("member", type=Map).__setitem__("t", Text("hi"))),
    ]
    for u in bad_updates:
        assert_unchanged(push([Entry.sign(ATTACKER, SWARM.run_id, KIND_PEER, gen, 0, b"", u).encode()]))
    # An entry continuing the victim's chain, signed by the attacker.
    nxt = Entry.sign(
        ATTACKER, SWARM.run_id, KIND_PEER, victim_doc.gen, victim_doc.seq, victim_doc.head, bad_updates[0]
    )
    assert_unchanged(
        push([Entry(KIND_PEER, victim_pk, nxt.gen, nxt.seq, nxt.prev, nxt.update, nxt.sig).encode()])
    )


def test_oversized_and_lying_inputs_change_nothing():
    gen = 2
    huge = update_from(
        client_id(ATTACKER_PK, gen), lambda d, r: r["member"].__setitem__("x", "a" * MAX_ENTRY_BYTES)
    )
    assert_unchanged(push([Entry.sign(ATTACKER, SWARM.run_id, KIND_PEER, gen, 0, b"", huge).encode()]))
    assert_unchanged(b"\x80" * (MAX_SYNC_MESSAGE_BYTES + 1))
    # Yjs headers that declare 2**28 clients or structs: pycrdt would allocate half a gigabyte.
    for lie in (
        b"\x80\x80\x80\x80\x01\x00",
        b"\x01\x80\x80\x80\x80\x01\x01\x00",
        b"\x00\x80\x80\x80\x80\x01",
    ):
        assert_unchanged(push([Entry.sign(ATTACKER, SWARM.run_id, KIND_PEER, gen, 0, b"", lie).encode()]))
    # msgpack containers that claim more elements than the limits allow.
    assert_unchanged(msgpack.packb({"v": 1, "t": "push", "e": [b""] * 5000}))
    assert_unchanged(b"\xdd\xff\xff\xff\xff")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_updates_are_rejected_cleanly_or_applied_whole(data):
    """Every pycrdt call is guarded: a mutated update either fails with `Rejected` and leaves the
    replica as it was, or is a well-formed update of the owner's own client and is applied whole."""
    key = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
    owner = public_bytes(key)
    writer, first = DocReplica.start(key, KIND_PEER, owner, 3, b"r", {"member": {"addrs": ["a"], "round": 1}})
    second = writer.write(key, lambda r: r["bans"].__setitem__("k", "why"))
    replica = DocReplica(KIND_PEER, owner, 3, b"r")
    replica.apply(first)
    replica.read()  # build the pycrdt Doc so the mutated update really reaches yrs
    u = bytearray(second.update)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(u) - 1)))
        if op == "flip" and u:
            u[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del u[pos:]
        else:
            u[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
    mutated = Entry.sign(key, b"r", KIND_PEER, 3, 1, first.id(b"r"), bytes(u))
    before = (replica.seq, replica.clock, replica.doc.get_state(), replica.read())
    try:
        replica.apply(mutated)
    except Rejected:
        assert (replica.seq, replica.clock, replica.doc.get_state(), replica.read()) == before
    else:
        assert replica.seq == 2


def test_pycrdt_panics_become_errors_and_leave_the_document_whole():
    s = Swarm(2, seed=3)
    creator = s.states[0]
    s.do(0, creator.set_config({"lr": 0.1}))
    with pytest.raises(RunStateError):
        creator.set_config({"lr": 0.2, "steps": 2**63})  # pyo3 panics: a BaseException, not an Exception
    s.do(0, creator.set_config({"lr": 0.3}))
    assert s.settle()
    assert s.states[1].config() == {"lr": 0.3}


def test_a_sender_of_garbage_is_dropped_and_others_are_not():
    s = Swarm(2, seed=5)
    victim, honest = s.states
    bad = random.randbytes(32)
    for _ in range(MAX_STRIKES):
        victim.on_message(bad, b"\xc1garbage", s.now)
    assert bad in victim.limiter.dropped(s.now)
    ae = wire.encode(wire.AntiEntropy(b"\0" * 16, b"\0" * 16))
    assert victim.on_message(bad, ae, s.now) == []
    assert victim.on_message(honest.me, ae, s.now) != []


def test_a_flooding_sender_is_rate_limited():
    s = Swarm(1, seed=6)
    victim = s.states[0]
    ae = wire.encode(wire.AntiEntropy(b"\0" * 16, b"\0" * 16))
    answered = sum(bool(victim.on_message(b"f" * 32, ae, s.now)) for _ in range(5000))
    assert 0 < answered < 5000


def test_equivocation_is_proven_and_bans_the_writer_everywhere():
    s = Swarm(4, seed=8)
    assert s.settle()
    liar = s.states[3]
    own = liar.docs[(KIND_PEER, liar.me)]
    # Two different updates for the same slot, each shown to a different replica: the liar's own
    # document writes one, a copy of the same chain (same client, same clock) the other.
    fork = DocReplica(KIND_PEER, liar.me, own.gen, s.run_id, writer=True)
    for e in own.entries:
        fork.apply(e)
    a = own.write(liar.key, lambda r: r["member"].__setitem__("round", 1))
    b = fork.write(liar.key, lambda r: r["member"].__setitem__("round", 2))
    assert a.slot == b.slot and a.id(s.run_id) != b.id(s.run_id)
    s.net.nodes.pop(liar.me)  # the liar stays quiet; its two versions travel on their own
    s.states = s.states[:3]
    s.states[0].on_message(liar.me, push([a.encode()]), s.now)
    s.states[1].on_message(liar.me, push([b.encode()]), s.now)
    assert s.settle()
    for x in s.states:
        assert "equivocation" in x.bans()[liar.me]
        assert liar.me not in {m.key for m in x.members(s.now)}


def test_control_a_valid_join_does_change_state():
    """The harness above would notice a change: a well-formed, correctly signed join is accepted."""
    s = settled_swarm()
    victim = s.states[1]
    newcomer = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
    _, snapshot = DocReplica.start(
        newcomer, KIND_PEER, public_bytes(newcomer), 4, s.run_id, {"member": {"round": 3}}
    )
    before = fingerprint(victim, s.now)
    victim.on_message(random.randbytes(32), push([snapshot.encode()]), s.now)
    assert fingerprint(victim, s.now) != before
    assert public_bytes(newcomer) in {m.key for m in victim.members(s.now)}
