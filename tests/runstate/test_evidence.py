"""Exclusion from pairing by published evidence of poisoned updates (issue 18): no single accuser excludes
anyone, a quorum of independent members does, and an accuser nobody backs pays for it."""

from shoal.gossip.runstate.limits import MAX_LONE_ACCUSATIONS
from shoal.gossip.runstate.sim import Swarm


def every_member_at(s: Swarm, round_: int) -> None:
    """Every member publishes that it finished `round_`: the run's round, which sets evidence's clocks."""
    for i, x in enumerate(s.states):
        s.do(i, x.set_round(round_))


def test_one_accuser_excludes_nobody_and_two_exclude_everywhere():
    s = Swarm(8, seed=41)
    st = s.states
    s.do(1, st[1].accuse(st[7].me, 12, "3 refusals in rounds 4-12: direction"))
    assert s.settle()
    for x in st:
        assert x.excluded() == {}
        assert set(x.evidence()[st[7].me]) == {st[1].me}
    s.do(2, st[2].accuse(st[7].me, 14, "3 refusals in rounds 6-14: outlier-cos"))
    assert s.settle()
    for x in st:  # every replica draws the same conclusion from the same signed documents
        assert set(x.excluded()) == {st[7].me}
        assert "2 members" in x.excluded()[st[7].me]
        assert st[7].me in {m.key for m in x.members(s.now)}  # still a member: only unpaired


def test_the_quorum_grows_with_the_run():
    s = Swarm(12, seed=42)  # 12 members: a quarter is 3 accusers
    st = s.states
    for i in (1, 2):
        s.do(i, st[i].accuse(st[11].me, 9, "scaled update"))
    assert s.settle()
    assert st[0].excluded() == {}
    s.do(3, st[3].accuse(st[11].me, 9, "scaled update"))
    assert s.settle()
    assert set(st[0].excluded()) == {st[11].me}


def test_an_accuser_nobody_backs_loses_its_voice_and_is_excluded():
    s = Swarm(8, seed=43)
    st = s.states
    liar = st[6]
    # One lone accusation more than allowed, and one that an honest accuser backs (st[1]).
    for target in st[1 : MAX_LONE_ACCUSATIONS + 3]:
        s.do(6, liar.accuse(target.me, 5, "made up"))
    # With the liar silenced, the honest accuser's one voice is not a quorum.
    s.do(5, st[5].accuse(st[1].me, 5, "refused 3 times"))
    assert s.settle()
    for x in st:
        excluded = x.excluded()
        assert set(excluded) == {liar.me}
        assert "no other member accused" in excluded[liar.me]


def test_a_peer_cannot_accuse_itself_and_banned_peers_do_not_count():
    s = Swarm(6, seed=44)
    st = s.states
    s.do(3, st[3].accuse(st[3].me, 1, "me"))
    s.do(0, st[0].ban(st[4].me, "sent NaNs"))
    s.do(4, st[4].accuse(st[2].me, 1, "revenge"))
    s.do(5, st[5].accuse(st[2].me, 1, "revenge"))
    assert s.settle()
    assert st[1].excluded() == {}
    assert st[3].me not in st[1].evidence()


def test_evidence_expires_so_an_exclusion_heals_by_itself():
    from shoal.gossip.runstate.limits import EVIDENCE_TTL_ROUNDS

    s = Swarm(8, seed=45)
    st = s.states
    for i in (1, 2):
        s.do(i, st[i].accuse(st[7].me, 10, "3 refusals"))
    every_member_at(s, 10 + EVIDENCE_TTL_ROUNDS)
    assert s.settle()
    assert set(st[0].excluded()) == {st[7].me}  # the evidence is as old as it may be: it still counts
    every_member_at(s, 11 + EVIDENCE_TTL_ROUNDS)
    assert s.settle()
    assert st[0].excluded() == {}


def test_a_member_silent_to_two_partners_is_excluded_for_a_while_and_then_paired_again():
    """Issue 16: a member that keeps its heartbeats but never answers its partners sits out for
    SILENCE_TTL_ROUNDS after the last accusation, everywhere alike; one accuser alone excludes nobody."""
    from shoal.gossip.runstate.limits import SILENCE_TTL_ROUNDS

    s = Swarm(8, seed=46)
    st = s.states
    every_member_at(s, 20)
    s.do(1, st[1].report_silence(st[7].me, 20, "no answer for 15 s"))
    assert s.settle()
    assert st[0].excluded() == {}
    s.do(2, st[2].report_silence(st[7].me, 21, "connection refused"))
    assert s.settle()
    for x in st:
        assert set(x.excluded()) == {st[7].me}
        assert "silent to 2 partners" in x.excluded()[st[7].me]
    every_member_at(s, 20 + SILENCE_TTL_ROUNDS)
    assert s.settle()
    assert set(st[0].excluded()) == {st[7].me}  # the older accusation is as old as it may be
    every_member_at(s, 21 + SILENCE_TTL_ROUNDS)
    assert s.settle()
    assert st[0].excluded() == {}  # it lapsed: one voice is left


def test_lone_silence_accusations_cost_the_accuser_nothing():
    """A broken link between two honest peers makes lone accusations; they must not silence the accuser."""
    s = Swarm(8, seed=47)
    st = s.states
    for target in st[1:6]:
        s.do(6, st[6].report_silence(target.me, 3, "connection refused"))
    assert s.settle()
    assert st[0].excluded() == {}


def test_a_member_keeps_a_bounded_list_of_its_silence_accusations():
    from shoal.gossip.runstate.limits import MAX_SILENCE_ENTRIES, SILENCE_TTL_ROUNDS

    s = Swarm(2, seed=48)
    me = s.states[0]
    keys = [bytes([i]) * 32 for i in range(1, MAX_SILENCE_ENTRIES + 6)]
    for n, key in enumerate(keys):
        s.do(0, me.report_silence(key, 100 + n // 2, "no answer"))
        assert key in me.silence()
    assert len(me.silence()) == MAX_SILENCE_ENTRIES
    assert keys[0] not in me.silence()  # the oldest went
    s.do(0, me.report_silence(keys[0], 100 + len(keys) // 2 + SILENCE_TTL_ROUNDS + 1, "no answer"))
    assert set(me.silence()) == {keys[0]}  # accusations older than the TTL go


def test_one_made_up_round_does_not_age_out_the_evidence():
    """The run's round is the third highest any member published, so one member that claims round 2^62
    cannot make every piece of evidence (and every other member's activity) look ancient."""
    s = Swarm(8, seed=49)
    st = s.states
    every_member_at(s, 10)
    for i in (1, 2):
        s.do(i, st[i].accuse(st[7].me, 10, "3 refusals"))
    s.do(5, st[5].set_round(2**62))
    assert s.settle()
    assert set(st[0].excluded()) == {st[7].me}


def test_a_member_excluded_for_poisoned_updates_has_no_voice_about_silence():
    s = Swarm(8, seed=50)
    st = s.states
    for i in (1, 2):
        s.do(i, st[i].accuse(st[6].me, 5, "scaled update"))
    s.do(6, st[6].report_silence(st[3].me, 5, "made up"))
    s.do(7, st[7].report_silence(st[3].me, 5, "no answer"))
    assert s.settle()
    assert set(st[0].excluded()) == {st[6].me}  # one honest voice left against st[3]: no quorum


def test_three_strikes_from_two_members_exclude_and_one_member_alone_never_does():
    """A guard meets a partner about once in R−1 rounds: the run adds up its members' strikes. One member's
    count is capped, so its strikes alone exclude nobody however many it publishes."""
    s = Swarm(8, seed=51)
    st = s.states
    for r in (3, 11, 19, 27):
        s.do(1, st[1].report_strike(st[7].me, r, "guard: direction"))
    assert s.settle()
    assert st[1].strikes()[st[7].me][st[1].me]["strikes"] == 4
    assert st[0].excluded() == {}
    s.do(2, st[2].report_strike(st[7].me, 30, "guard: no-update"))
    assert s.settle()
    for x in st:
        assert set(x.excluded()) == {st[7].me}
        assert "3 strikes by 2 members' guards" in x.excluded()[st[7].me]


def test_strikes_by_members_are_counted_within_their_lifetime_and_lone_strikers_pay_nothing():
    from shoal.gossip.runstate.limits import EVIDENCE_TTL_ROUNDS

    s = Swarm(8, seed=52)
    st = s.states
    s.do(1, st[1].report_strike(st[7].me, 5, "guard: direction"))
    s.do(2, st[2].report_strike(st[7].me, 6, "guard: direction"))
    for target in st[2:7]:  # lone strikes of five peers: no exclusion, and st[3] keeps its voice
        s.do(3, st[3].report_strike(target.me, 7, "guard: no-update"))
    assert s.settle()
    assert st[0].excluded() == {}  # 2 strikes: not enough
    s.do(3, st[3].report_strike(st[7].me, 8, "guard: direction"))
    assert s.settle()
    assert set(st[0].excluded()) == {st[7].me}
    every_member_at(s, 6 + EVIDENCE_TTL_ROUNDS)
    assert s.settle()
    assert st[0].excluded() == {}  # st[1]'s strike aged out: 2 strikes left


def test_a_strike_after_the_lifetime_starts_the_count_again_and_the_list_is_bounded():
    from shoal.gossip.runstate.limits import EVIDENCE_TTL_ROUNDS, MAX_STRIKE_ENTRIES

    s = Swarm(2, seed=53)
    me = s.states[0]
    other = s.states[1].me
    s.do(0, me.report_strike(other, 10, "guard: direction"))
    s.do(0, me.report_strike(other, 11 + EVIDENCE_TTL_ROUNDS, "guard: direction"))
    assert me.strikes()[other][me.me]["strikes"] == 1
    keys = [bytes([i]) * 32 for i in range(1, MAX_STRIKE_ENTRIES + 6)]
    for n, key in enumerate(keys):
        s.do(0, me.report_strike(key, 300 + n, "guard: no-update"))
    assert len(me.strikes()) == MAX_STRIKE_ENTRIES
    assert keys[0] not in me.strikes() and keys[-1] in me.strikes()
