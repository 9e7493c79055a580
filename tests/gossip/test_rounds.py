"""Round protocol pieces without I/O: pairing, membership, the swap rules, the daemon's message checks."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.gossip.membership import Membership
from shoal.gossip.outer.methods import OuterConfig, OuterState, make_message
from shoal.gossip.outer.quant import pack_codes, unpack_codes
from shoal.gossip.outer.wire import Message, pack, packed_bits
from shoal.gossip.rounds import clock
from shoal.gossip.rounds import payload as dense
from shoal.gossip.rounds.pairing import partner_of
from shoal.gossip.rounds.swap import SwapBook, Verdict, should_stop_waiting
from shoal.transport.identity import generate_key

PEERS = [f"p{i:02d}" for i in range(7)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_every_peer_computes_the_same_partners(count):
    members = [f"q{i:02d}" for i in range(count)]
    for round_number in range(1, 20):
        partners = {p: partner_of(p, members, "run", round_number) for p in members}
        for peer, partner in partners.items():
            if partner is not None:
                assert partners[partner] == peer and partner != peer
        assert sum(p is None for p in partners.values()) == count % 2
        # The order of a peer's member list does not matter.
        assert all(partner_of(p, reversed(members), "run", round_number) == partners[p] for p in members)


def test_partners_change_from_round_to_round_and_between_runs():
    members = PEERS[:6]
    schedules = {tuple(partner_of(p, members, "run", r) for p in members) for r in range(1, 30)}
    assert len(schedules) > 5
    assert any(
        partner_of("p00", members, "run", r) != partner_of("p00", members, "other", r) for r in range(1, 10)
    )
    assert partner_of("p00", ["p01"], "run", 1) == "p01"  # we are added to a view that lacks us


def _member(addrs: str | list[str] = "/ip4/127.0.0.1/tcp/1", now: float = 0.0, **options) -> Membership:
    return Membership(generate_key(), "run", addrs, now=now, **options)


def test_membership_spreads_by_gossip_and_detects_the_dead():
    a, b, c = (_member(f"/ip4/127.0.0.1/tcp/{i}", fail_after=5.0) for i in (1, 2, 3))
    assert b.merge(a.table(), now=0.0) == [a.peer_id]
    assert set(c.merge(b.table(), now=0.0)) == {a.peer_id, b.peer_id}
    assert c.live(0.0) == sorted([a.peer_id, b.peer_id, c.peer_id]) and c.ready(0.0) == []
    a.set_ready()  # a's worker has loaded its model: that spreads too
    c.merge(a.table(), now=0.5)
    assert c.ready(0.5) == [a.peer_id]
    # a keeps beating (through b); b goes silent.
    for t in range(1, 10):
        a.beat(float(t), round_number=t)
        c.merge(a.table(), now=float(t))
    assert c.live(9.0) == sorted([a.peer_id, c.peer_id])
    assert c.members[a.peer_id].round == 9
    # A peer that says it is leaving is dropped at once.
    a.leave()
    c.merge(a.table(), now=9.5)
    assert c.live(9.5) == [c.peer_id]
    assert not c.refused


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.dictionaries(
                st.sampled_from(
                    ["peer_id", "addrs", "heartbeat", "round", "left", "ready", "at", "sig", "x"]
                ),
                st.one_of(
                    st.none(),
                    st.integers(-5, 5),
                    st.text(max_size=300),
                    st.booleans(),
                    st.binary(min_size=64, max_size=64),
                    st.lists(st.one_of(st.text(max_size=300), st.integers()), max_size=12),
                ),
            ),
        ),
        max_size=20,
    )
)
@settings(max_examples=200, deadline=None)
def test_membership_survives_any_table(table):
    m = _member()
    assert m.merge(table, now=1.0) == []  # nothing unsigned gets in
    assert m.is_live(m.peer_id, 1.0) and list(m.members) == [m.peer_id]


def test_members_gossip_their_signed_address_lists():
    relayed = "/ip4/1.2.3.4/tcp/1/p2p/R/p2p-circuit/p2p/a"
    a = _member(["/ip4/203.0.113.5/tcp/1", relayed])
    b = _member("/ip4/127.0.0.1/tcp/2")
    b.merge(a.table(), now=1.0)
    assert b.addrs_of(a.peer_id) == list(a.me.addrs) and b.addr_of(a.peer_id) == a.me.addrs[0]
    a.set_addrs([relayed])  # behind a NAT after all: only the relayed address is published
    b.merge(a.table(), now=2.0)
    assert b.addrs_of(a.peer_id) == [relayed]


def _forge(entry: dict, **changes) -> dict:
    return {**entry, **changes}


def test_nobody_speaks_for_another_member():
    a, b = _member("/ip4/10.0.0.1/tcp/1"), _member("/ip4/10.0.0.2/tcp/2")
    attacker = _member("/ip4/6.6.6.6/tcp/6")
    b.merge(a.table(), now=0.0)
    entry = next(e for e in a.table() if e["peer_id"] == a.peer_id)
    forgeries = [
        _forge(entry, heartbeat=entry["heartbeat"] + 10**6, left=True),  # "a left"
        _forge(entry, heartbeat=entry["heartbeat"] + 1, addrs=["/ip4/6.6.6.6/tcp/6"]),  # "a moved"
        _forge(entry, heartbeat=entry["heartbeat"] + 1, round=10**6),  # "a is far ahead"
        _forge(entry, heartbeat=entry["heartbeat"] + 1, sig=bytes(64)),
        # the attacker's own signature on a's entry
        _forge(entry, heartbeat=entry["heartbeat"] + 1, left=True, sig=attacker.table()[0]["sig"]),
    ]
    b.merge(forgeries, now=1.0)
    assert b.is_live(a.peer_id, 1.0) and b.addrs_of(a.peer_id) == ["/ip4/10.0.0.1/tcp/1"]
    assert b.members[a.peer_id].round == 0 and sum(b.refused.values()) == len(forgeries)
    # Invented members: ids that are not peer ids, or real ids whose key never signed the entry.
    stranger = _member()
    invented = [_forge(entry, peer_id=f"member-{i}") for i in range(50)] + [
        _forge(entry, peer_id=stranger.peer_id)
    ]
    assert b.merge(invented, now=1.0) == [] and set(b.members) == {a.peer_id, b.peer_id}
    # A relay passes a's entry on exactly as a signed it, and that is believed.
    a.beat(2.0, round_number=3)
    attacker.merge(a.table(), now=2.0)
    assert b.merge(attacker.table(), now=2.0) == [attacker.peer_id]
    assert b.members[a.peer_id].round == 3


def test_a_table_of_forgeries_costs_a_bounded_number_of_signature_checks():
    a, b = _member(), _member()
    b.merge(a.table(), now=0.0)
    entry = a.table()[0]
    strangers = [_member() for _ in range(100)]
    forged = [{**m.table()[0], "round": 7} for m in strangers]  # valid ids, broken signatures
    repeated = [{**entry, "heartbeat": entry["heartbeat"] + i, "left": True} for i in range(1, 1000)]
    checked = 0
    original = b._signed_by_member

    def counting(e):
        nonlocal checked
        checked += 1
        return original(e)

    b._signed_by_member = counting
    assert b.merge(forged + repeated, now=1.0) == []
    assert checked <= 2 * 2 + 64 and b.is_live(a.peer_id, 1.0)
    assert b.refused["entries listed twice in one table"] == 998


def test_entries_of_another_run_and_replays_are_refused():
    a = _member()
    other_run = Membership(a.key, "another-run", "/ip4/10.0.0.1/tcp/1", now=0.0)
    b = _member()
    assert b.merge(other_run.table(), now=0.0) == []  # signed for another run: the signature fails
    wall = [1000.0]
    c = _member(wall_clock=lambda: wall[0])
    old = c.table()
    wall[0] += 3600.0  # an hour later a stranger replays c's entry to a newcomer
    assert b.merge(old, now=1.0) == []
    assert b.refused


def test_a_forgotten_member_is_not_gossiped_back_to_life():
    a, b = _member(), _member(fail_after=5.0)
    b.merge(a.table(), now=0.0)
    stale = a.table()
    b.forget_dead(now=100.0)
    assert a.peer_id not in b.members
    assert b.merge(stale, now=100.0) == []  # a relay still held a's last entry
    a.beat(101.0, round_number=1)  # a itself comes back: a new heartbeat is believed
    assert b.merge(a.table(), now=101.0) == [a.peer_id]


def test_membership_refuses_impostors_and_huge_tables():
    m = _member("/ip4/127.0.0.1/tcp/1")
    forged = _forge(m.table()[0], addrs=["/ip4/6.6.6.6/tcp/1"], heartbeat=10**9, left=True)
    m.merge([forged], now=1.0)
    assert m.me.addr == "/ip4/127.0.0.1/tcp/1" and not m.me.left and not m.claims_of_self
    twin = Membership(m.key, "run", "/ip4/10.9.9.9/tcp/9", now=0.0)  # a copy of m's key file elsewhere
    m.merge(twin.table(), now=1.0)
    assert m.claims_of_self == {"/ip4/10.9.9.9/tcp/9"}
    assert m.merge([{}] * 10_000, now=1.0) == []


def test_swap_book_holds_accepts_and_refuses():
    book = SwapBook("b")
    assert book.on_offer("a", 1).verdict is Verdict.HOLD  # not ready yet
    assert book.on_offer("a", 9).verdict is Verdict.REFUSE  # too far ahead
    book.ready(1, "a")
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
    # it jumped to the run's round, past ours: it will never swap in ours
    assert should_stop_waiting({"finished": 2, "ready": True, "round": 9, "partner": "b"}, "b", 3)


def test_a_peer_that_jumped_to_the_run_round_holds_offers_near_that_round():
    book = SwapBook("b")
    book.finish(5)
    book.ready(20, "a")  # skipped round 5, then jumped to the run's round 20
    assert book.status(20)["round"] == 20 and book.status(20)["finished"] == 5
    assert book.on_offer("a", 20).verdict is Verdict.ACCEPT
    assert book.on_offer("c", 21).verdict is Verdict.HOLD  # the next round, not "too far ahead of 6"
    assert book.on_offer("c", 12).verdict is Verdict.REFUSE  # between the rounds we skipped over


def test_the_run_round_is_what_most_members_say_plus_one():
    assert clock.run_round([]) is None
    assert clock.run_round([7, 7, 8]) == 8
    assert clock.run_round([7, 10**9, 7]) == 8  # one liar among three moves nothing
    assert clock.run_round([0, 10**9, 3, 3, 4]) == 4
    assert clock.run_round([3, 4]) == 4  # one of two sat a round out and is a round further on: no jump
    assert clock.run_round([3, 10**9]) == 4  # one liar among two


def test_a_peer_behind_jumps_and_one_far_ahead_waits():
    assert clock.next_round(5, None) == 5  # nobody answered: our own round
    assert clock.next_round(5, 40) == 40  # behind: the run's round
    assert clock.next_round(50, 40) == 50  # ahead: never back
    assert clock.next_round(8, 12, last=10) == 10  # never past the run's last round
    # one round behind, but our partner in that round has yet to swap it: it waits for us, stay
    assert clock.next_round(7, 8, partner_waits=True) == 7
    assert clock.still_in(7, finished=6, here=7) and clock.still_in(7, finished=5, here=6)
    assert not clock.still_in(7, finished=7, here=8) and not clock.still_in(7, finished=6, here=9)
    assert clock.lead(40, 40) == 0 and clock.lead(42, 40) == 0  # partners hold offers this far ahead
    assert clock.lead(50, 40) == 8  # further: wait for the run
    assert clock.lead(50, None) == 0


def _decide(proposed: int, partner: SwapBook, number: int | None = None) -> tuple[int, int | None, int]:
    """What a peer of a two-peer run takes from its partner's status: (round, run, partner's round)."""
    where = partner.status(number or proposed)
    run = clock.run_round([where["finished"]])
    waits = clock.still_in(proposed, where["finished"], where["round"])
    return clock.next_round(proposed, run, partner_waits=waits), run, where["round"]


def test_two_peers_meet_after_one_restarts_behind_the_other():
    """The survivor q skipped round 9 (p was gone) and is in round 10; p restarted from its checkpoint of
    round 6. Each decides from the other's status, in either order: they meet in round 10."""
    q, p = SwapBook("q"), SwapBook("p")
    q.finish(9)
    p.finish(6)
    # q asks first: p is 3 rounds behind, further than partners hold offers for, so q waits.
    number_q, run, here = _decide(10, p)
    assert (number_q, run) == (10, 7) and clock.lead(number_q, run, here) == 1
    # p's first round: behind, it jumps to q's round and is ready there.
    number_p, _, _ = _decide(7, q)
    assert number_p == 10
    p.ready(number_p, "q")
    # q asks again: p still says it finished round 6, but it is in q's round, waiting for it. Before,
    # q waited for p's finished round to catch up, which it does only once they swap: until q's
    # deadline, past which p had given up round 10 (when it asked q before q began to wait).
    _, run, here = _decide(number_q, p)
    assert run == 7 and clock.lead(number_q, run, here) == 0


def test_a_waiting_peer_follows_a_partner_that_gave_up_its_round():
    """q waits in round 10 for a run at round 7 (its partner p); p jumped to round 10, gave up waiting
    for q there, and went on to round 11. q must follow it to 11, not swap alone in 10 while p waits in
    11 (the pair leapfrogging each other: 7 -> 10, 10 -> 11 ...)."""
    q, p = SwapBook("q"), SwapBook("p")
    q.finish(9)
    p.finish(10)  # p jumped to round 10 from round 7 and skipped it: q was still waiting
    assert _decide(11, q)[0] == 11  # p stays in its next round, 11: q has finished only round 9
    p.ready(11, "q")
    number_q, run, here = _decide(10, p)  # the shell's decision after q's wait: past round 10
    assert (number_q, run) == (11, 11) and clock.lead(number_q, run, here) == 0


SPEC = [("w", (3, 4)), ("b", (4,))]
BITS = OuterConfig.tuned("compressed-noloco").lattice_bits
LAYOUT = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}


def lattice_message(**changes) -> bytes:
    """A well-formed compressed-noloco message for SPEC, with `changes` applied to its fields."""
    # Sorted names: b (4 values) then w (12 values), the default's lattice codes bit-packed.
    codes = [bytes(packed_bits(4, BITS)), bytes(packed_bits(12, BITS))]
    fields = {"tensors": codes, "steps": [0.1, 0.1], "kind": "compressed-noloco"}
    fields.update(changes)
    return pack(Message(fields["kind"], "peer-a", 3, tensors=fields["tensors"], steps=fields["steps"]))


def test_a_well_formed_message_passes_every_check():
    dense.check_message(lattice_message(), "compressed-noloco", SPEC, BITS)
    state = OuterState.fresh("peer-a", LAYOUT)
    sparse = make_message(OuterConfig.tuned("pair-sparseloco"), state, {n: t + 1 for n, t in LAYOUT.items()})
    dense.check_message(sparse, "pair-sparseloco", SPEC, BITS)
    noloco = make_message(OuterConfig.tuned("noloco"), OuterState.fresh("p", LAYOUT), LAYOUT)
    dense.check_message(noloco, "noloco", SPEC, BITS)


def test_messages_that_do_not_fit_the_model_are_refused():
    good = lattice_message()
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "trailing bytes": good + b"\0",
        "another method": lattice_message(kind="noloco"),
        "a tensor missing": lattice_message(tensors=[bytes(2)]),
        "wrong shape": lattice_message(tensors=[bytes(3), bytes(5)]),
        "NaN step": lattice_message(steps=[float("nan"), 0.1]),
        "negative step": lattice_message(steps=[-1.0, 0.1]),
        "no steps": lattice_message(steps=[]),
    }
    for payload in cases.values():
        with pytest.raises(dense.PayloadError):
            dense.check_message(payload, "compressed-noloco", SPEC, BITS)
    with_nan = np.zeros(4, dtype=np.float32)
    with_nan[1] = np.nan
    bad_dense = pack(
        Message("noloco", "p", 1, tensors=[with_nan.tobytes(), np.zeros(12, np.float32).tobytes()])
    )
    with pytest.raises(dense.PayloadError, match="non-finite"):
        dense.check_message(bad_dense, "noloco", SPEC, BITS)
    no_update = pack(Message("pair-sparseloco", "p", 1))
    with pytest.raises(dense.PayloadError):
        dense.check_message(no_update, "pair-sparseloco", SPEC, BITS)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_the_message_check_raises_only_its_error(data):
    with contextlib.suppress(dense.PayloadError):
        dense.check_message(data, "compressed-noloco", SPEC, BITS)


@pytest.mark.parametrize("bits", range(2, 9))
def test_lattice_codes_travel_at_their_bit_width(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, 1001, bits), codes)
