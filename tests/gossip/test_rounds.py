"""Round protocol pieces without I/O: pairing, membership, the swap rules, the dense payload."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.membership import Membership
from gossip.rounds import payload as dense
from gossip.rounds.pairing import pairing, partner_of
from gossip.rounds.swap import SwapBook, Verdict, should_stop_waiting

PEERS = [f"p{i:02d}" for i in range(7)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_pairing_is_a_matching_that_every_peer_computes_alike(count):
    members = PEERS[:count] if count <= len(PEERS) else [f"q{i}" for i in range(count)]
    for round_number in range(1, 20):
        partners = pairing(members, "run", round_number)
        assert set(partners) == set(members)
        for peer, partner in partners.items():
            if partner is not None:
                assert partners[partner] == peer and partner != peer
        assert sum(p is None for p in partners.values()) == count % 2
        # Order of the member list does not matter: every peer gets the same answer.
        assert pairing(list(reversed(members)), "run", round_number) == partners


def test_pairing_changes_from_round_to_round_and_between_runs():
    schedules = {tuple(sorted(pairing(PEERS[:6], "run", r).items())) for r in range(1, 30)}
    assert len(schedules) > 5
    assert any(pairing(PEERS[:6], "run", r) != pairing(PEERS[:6], "other-run", r) for r in range(1, 10))
    assert partner_of("p00", PEERS[1:2], "run", 1) == "p01"


def test_membership_spreads_by_gossip_and_detects_the_dead():
    a = Membership("a", "127.0.0.1:1", now=0.0, fail_after=5.0)
    b = Membership("b", "127.0.0.1:2", now=0.0, fail_after=5.0)
    c = Membership("c", "127.0.0.1:3", now=0.0, fail_after=5.0)
    assert b.merge(a.table(), now=0.0) == ["a"]
    assert set(c.merge(b.table(), now=0.0)) == {"a", "b"}
    assert c.live(0.0) == ["a", "b", "c"]
    # a keeps beating (through b); b goes silent.
    for t in range(1, 10):
        a.beat(float(t), round_number=t)
        c.merge(a.table(), now=float(t))
    assert c.live(9.0) == ["a", "c"]
    assert c.members["a"].round == 9
    # A peer that says it is leaving is dropped at once.
    a.leave()
    c.merge(a.table(), now=9.5)
    assert c.live(9.5) == ["c"]


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.dictionaries(
                st.sampled_from(["peer_id", "addr", "heartbeat", "round", "left", "x"]),
                st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=300), st.booleans()),
            ),
        ),
        max_size=20,
    )
)
@settings(max_examples=200, deadline=None)
def test_membership_survives_any_table(table):
    m = Membership("me", "127.0.0.1:1", now=0.0)
    m.merge(table, now=1.0)
    assert m.is_live("me", 1.0)
    for member in m.members.values():
        assert isinstance(member.peer_id, str) and isinstance(member.heartbeat, int) and member.heartbeat >= 0


def test_membership_refuses_impostors_and_huge_tables():
    m = Membership("me", "127.0.0.1:1", now=0.0)
    m.merge([{"peer_id": "me", "addr": "6.6.6.6:1", "heartbeat": 10**9, "round": 5, "left": True}], now=1.0)
    assert m.me.addr == "127.0.0.1:1" and not m.me.left
    assert m.merge([{}] * 10_000, now=1.0) == []


def test_swap_book_holds_accepts_and_refuses():
    book = SwapBook("b")
    assert book.on_offer("a", 1).verdict is Verdict.HOLD  # not ready yet
    assert book.on_offer("a", 9).verdict is Verdict.REFUSE  # too far ahead
    book.ready(1, "a", b"payload")
    assert book.on_offer("c", 1).verdict is Verdict.REFUSE  # not our partner
    assert book.on_offer("a", 1).verdict is Verdict.ACCEPT
    assert book.complete(1) and not book.complete(1)  # a round is swapped at most once
    assert book.on_offer("a", 1).verdict is Verdict.REFUSE
    book.finish(1)
    assert book.on_offer("a", 1).verdict is Verdict.REFUSE  # over
    assert book.on_offer("a", 2).verdict is Verdict.HOLD


def test_a_waiting_responder_gives_up_when_its_partner_moved_on_or_paired_elsewhere():
    assert should_stop_waiting({"finished": 3, "ready": False}, "b", 3)
    assert should_stop_waiting({"finished": 2, "ready": True, "round": 3, "partner": "c"}, "b", 3)
    assert should_stop_waiting({"finished": 2, "ready": True, "round": 3, "partner": "b"}, "b", 3) is None
    assert should_stop_waiting({"finished": 2, "ready": False, "round": 3}, "b", 3) is None


SPEC = [("w", (3, 4)), ("b", (4,))]


def test_dense_payload_round_trip_and_hostile_variants():
    values = np.arange(16, dtype=np.float32)
    payload = dense.encode(SPEC, values)
    assert np.array_equal(dense.decode(payload, SPEC), values)
    bad = values.copy()
    bad[3] = np.inf
    cases = [
        b"",
        payload[:3],
        payload[:-1],
        payload + b"\0",
        struct.pack(">I", 2**31) + payload[4:],
        dense.encode([("w", (4, 3)), ("b", (4,))], values),
        dense.encode([("w", (3, 4))], values[:12]),
        dense.encode(SPEC, bad),
    ]
    for case in cases:
        with pytest.raises(dense.PayloadError):
            dense.decode(case, SPEC)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_dense_decoder_raises_only_its_error(data):
    try:
        dense.decode(data, SPEC)
    except dense.PayloadError:
        pass
