"""Gossip targets (issue 16): members that never answer must not stall the spread of honest heartbeats.
A crowd of silent members gets the random half of the choices at most; members that answered lately are
swapped with every tick, even after our view presumed them dead; a member that failed backs off."""

import random

from shoal.gossip.targets import BACKOFF_MAX_S, BACKOFF_MIN_S, RECENT_S, GossipTargets

HONEST = [f"honest-{i}" for i in range(3)]
SILENT = [f"silent-{i}" for i in range(50)]


def test_with_fifty_silent_members_every_tick_still_reaches_an_honest_one():
    targets = GossipTargets(random.Random(1))
    for peer in HONEST:
        targets.answered(peer, 0.0)
    now, honest_ticks = 1.0, 0
    for _ in range(200):
        picked = targets.tick(HONEST + SILENT, HONEST + SILENT, now)
        assert 1 <= len(picked) <= 2
        honest_ticks += any(p in HONEST for p in picked)
        for peer in picked:
            (targets.answered if peer in HONEST else targets.failed)(peer, now)
        now += 1.0
    assert honest_ticks == 200


def test_a_member_presumed_dead_in_our_view_is_still_swapped_with_while_it_answered_lately():
    targets = GossipTargets(random.Random(2))
    targets.answered("honest-0", 0.0)
    # Our view lost it (its heartbeats were late), and only silent members look alive.
    picked = targets.tick(SILENT, ["honest-0", *SILENT], 5.0)
    assert "honest-0" in picked
    assert targets.tick(SILENT, ["honest-0", *SILENT], RECENT_S + 1.0)[-1] != "honest-0"


def test_in_a_run_where_everyone_answers_a_tick_is_one_swap_as_plain_gossip():
    targets = GossipTargets(random.Random(3))
    for peer in HONEST:
        targets.answered(peer, 0.0)
    assert all(len(targets.tick(HONEST, HONEST, 1.0)) == 1 for _ in range(50))


def test_a_member_that_failed_backs_off_longer_each_time_and_is_forgiven_when_it_answers():
    targets = GossipTargets(random.Random(4))
    peer = ["silent-0"]
    targets.failed("silent-0", 0.0)
    assert targets.backing_off("silent-0", BACKOFF_MIN_S - 0.1)
    assert targets.tick(peer + HONEST, peer, BACKOFF_MIN_S - 0.1)[0] != "silent-0"
    assert not targets.backing_off("silent-0", BACKOFF_MIN_S)
    assert targets.tick(peer, peer, BACKOFF_MIN_S) == peer
    targets.failed("silent-0", 10.0)
    assert targets.backing_off("silent-0", 10.0 + 2 * BACKOFF_MIN_S - 0.1)
    for _ in range(20):
        targets.failed("silent-0", 100.0)
    assert targets.backing_off("silent-0", 100.0 + BACKOFF_MAX_S - 0.1)
    assert not targets.backing_off("silent-0", 100.0 + BACKOFF_MAX_S)
    targets.failed("silent-0", 150.0)
    targets.answered("silent-0", 151.0)
    assert not targets.backing_off("silent-0", 151.0)


def test_a_backoff_never_starves_gossip_when_every_member_is_backing_off():
    """Two peers under load that time out on each other keep gossiping, or they would presume each
    other dead."""
    targets = GossipTargets(random.Random(7))
    targets.failed("honest-0", 0.0)
    assert targets.tick(["honest-0"], ["honest-0"], 1.0) == ["honest-0"]
    assert targets.sample(["honest-0"], 5, 1.0) == ["honest-0"]


def test_the_round_clocks_sample_prefers_members_that_answer_and_skips_those_backing_off():
    targets = GossipTargets(random.Random(5))
    for peer in HONEST:
        targets.answered(peer, 0.0)
    for peer in SILENT[:40]:
        targets.failed(peer, 0.0)
    asked = [targets.sample(HONEST + SILENT, 5, 1.0) for _ in range(100)]
    assert all(len(a) == len(set(a)) == 5 for a in asked)
    assert not any(p in SILENT[:40] for a in asked for p in a)
    assert sum(p in HONEST for a in asked for p in a) / 100 > 1.5  # 3 of 13 usable, half the picks


def test_what_it_knows_is_bounded_by_the_membership():
    targets = GossipTargets()
    for peer in SILENT:
        targets.failed(peer, 0.0)
        targets.answered(peer + "x", 0.0)
    targets.forget_all_but(HONEST)
    assert targets._answered == {} and targets._failed == {}


def test_a_member_that_fails_a_request_is_no_longer_counted_as_answering():
    targets = GossipTargets(random.Random(6))
    targets.answered("pushy", 0.0)
    assert targets.responsive("pushy", 1.0)
    targets.failed("pushy", 1.0)
    assert not targets.responsive("pushy", 1.5)
