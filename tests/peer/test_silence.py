"""Silent partners (issue 16): a partner that gave no sign of life in our round is accused to the run only
if it went on beating in the same life; a crash or a restart is no silence. Real signed membership tables,
no sockets (peer/silence.py is bookkeeping); the live run is tests/peer/test_silent_member.py."""

from shoal.gossip.membership import Membership
from shoal.peer.silence import SilenceWatch
from shoal.transport.identity import generate_key

WALL_MS = 1_800_000_000_000
FAIL_AFTER = 5.0


def member(incarnation: int = WALL_MS) -> Membership:
    return Membership(
        generate_key(), "run", "/ip4/10.0.0.2/tcp/1", now=0.0, fail_after=FAIL_AFTER,
        incarnation=incarnation, wall_clock=lambda: WALL_MS / 1000,
    )  # fmt: skip


def watcher() -> tuple[Membership, SilenceWatch, list[tuple[str, int, str]]]:
    me = member()
    reports: list[tuple[str, int, str]] = []
    watch = SilenceWatch(me.peer_id, lambda: me, lambda *a: reports.append(a), confirm_s=2 * FAIL_AFTER)
    return me, watch, reports


def beat_into(me: Membership, other: Membership, now: float, times: int = 1) -> None:
    for _ in range(times):
        other.beat(now, 0)
    me.merge(other.table(), now)


def test_a_partner_that_goes_on_beating_in_the_same_life_is_accused_once_confirmed():
    me, watch, reports = watcher()
    sybil = member()
    beat_into(me, sybil, 1.0)
    watch.note(sybil.peer_id, 7, "partner answered nothing for 15 s", now=2.0)
    beat_into(me, sybil, 8.0)
    watch.check(now=9.0)
    assert reports == []  # not yet: a crash would not show before the membership's failure time
    beat_into(me, sybil, 11.0)
    watch.check(now=12.5)
    assert [(p, r) for p, r, _ in reports] == [(sybil.peer_id, 7)]
    assert "answered nothing" in reports[0][2]
    watch.check(now=30.0)
    assert len(reports) == 1  # one accusation per note


def test_a_partner_that_crashed_is_not_accused():
    me, watch, reports = watcher()
    crashed = member()
    beat_into(me, crashed, 1.0)
    watch.note(crashed.peer_id, 3, "connection failed", now=2.0)
    watch.check(now=12.5)  # no beat for 11.5 s: dead to us
    assert reports == []


def test_a_partner_that_restarted_is_not_accused():
    me, watch, reports = watcher()
    old = member()
    beat_into(me, old, 1.0)
    watch.note(old.peer_id, 3, "connection failed", now=2.0)
    # The same key back 6 s later: its new life counts heartbeats from the wall clock in milliseconds.
    new = Membership(old.key, "run", "/ip4/10.0.0.2/tcp/2", now=8.0, fail_after=FAIL_AFTER,
                     incarnation=WALL_MS + 8_000, wall_clock=lambda: WALL_MS / 1000 + 8)  # fmt: skip
    beat_into(me, new, 11.0)
    watch.check(now=12.5)
    assert me.is_live(old.peer_id, 12.5)
    assert reports == []


def test_silence_again_before_the_confirmation_does_not_restart_its_clock():
    me, watch, reports = watcher()
    sybil = member()
    beat_into(me, sybil, 1.0)
    for k in range(12):  # paired with it every second, silent every time
        watch.note(sybil.peer_id, 10 + k, "connection failed", now=2.0 + k)
        beat_into(me, sybil, 2.0 + k)
        watch.check(now=2.0 + k)
    # Confirmed 10 s after the first note (at 12 s, in round 20), not 10 s after the last.
    assert [(p, r) for p, r, _ in reports] == [(sybil.peer_id, 20)]


def test_after_accusing_a_partner_its_rounds_are_skipped_at_once_for_a_while_unless_it_restarts():
    from shoal.peer.silence import FAST_SKIP_S

    me, watch, reports = watcher()
    sybil = member()
    beat_into(me, sybil, 1.0)
    assert not watch.accused(sybil.peer_id, 1.0)
    watch.note(sybil.peer_id, 7, "connection failed", now=2.0)
    beat_into(me, sybil, 11.0)
    watch.check(now=12.0)
    assert len(reports) == 1
    assert watch.accused(sybil.peer_id, 13.0)
    watch.note(sybil.peer_id, 9, "connection failed", now=13.0)  # a skipped round is not noted again
    watch.check(now=30.0)
    assert len(reports) == 1
    assert not watch.accused(sybil.peer_id, 12.0 + FAST_SKIP_S + 1)  # it gets another chance later
    back = Membership(sybil.key, "run", "/ip4/10.0.0.2/tcp/2", now=20.0, fail_after=FAIL_AFTER,
                      incarnation=WALL_MS + 20_000, wall_clock=lambda: WALL_MS / 1000 + 20)  # fmt: skip
    beat_into(me, back, 20.0)
    assert not watch.accused(sybil.peer_id, 21.0)  # a new life: waited for like anyone
