"""Exclusion from pairing by published evidence of poisoned updates (issue 18): no single accuser excludes
anyone, a quorum of independent members does, and an accuser nobody backs pays for it."""

from shoal.gossip.runstate.limits import MAX_LONE_ACCUSATIONS
from shoal.gossip.runstate.sim import Swarm


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
    for i, x in enumerate(st):
        s.do(i, x.set_round(10 + EVIDENCE_TTL_ROUNDS))
    assert s.settle()
    assert set(st[0].excluded()) == {st[7].me}  # the evidence is as old as it may be: it still counts
    for i, x in enumerate(st):
        s.do(i, x.set_round(11 + EVIDENCE_TTL_ROUNDS))
    assert s.settle()
    assert st[0].excluded() == {}
