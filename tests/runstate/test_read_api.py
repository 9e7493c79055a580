"""What the daemon and the REPL read: config, delegates, admission, manifest, bans, liveness; and
documents staying bounded over a long run."""

import pytest

from shoal.gossip.runstate import KIND_PEER, Liveness, NotAuthorized
from shoal.gossip.runstate.limits import (
    COMPACT_AFTER_ENTRIES,
    DEAD_AFTER_S,
    MAX_CHAIN_ENTRIES,
    SUSPECT_AFTER_S,
)
from shoal.gossip.runstate.sim import Swarm


def test_only_the_creator_and_its_delegates_write_the_run():
    s = Swarm(3, seed=31)
    creator, delegate, member = s.states
    with pytest.raises(NotAuthorized):
        member.set_config({"lr": 1.0})
    with pytest.raises(NotAuthorized):
        delegate.set_delegates([member.me])
    s.do(0, creator.set_config({"lr": 0.1, "model": "gpt-small"}))
    s.do(0, creator.set_delegates([delegate.me]))
    assert s.settle()
    s.do(1, delegate.set_config({"lr": 0.05}))  # a later revision of the same key wins
    s.do(1, delegate.add_checkpoint("ef" * 32, 40, 123, ["a"]))
    assert s.settle()
    for x in s.states:
        assert x.config() == {"lr": 0.05, "model": "gpt-small"}
        assert x.manifest().hash == "ef" * 32 and x.manifest().by == delegate.me
    # Revoked: the delegate's documents no longer count anywhere.
    s.do(0, creator.set_delegates([]))
    assert s.settle()
    for x in s.states:
        assert x.config() == {"lr": 0.1, "model": "gpt-small"}
        assert x.manifest() is None
    with pytest.raises(NotAuthorized):
        delegate.set_config({"lr": 9.0})


def test_admission_rule_limits_members():
    s = Swarm(3, seed=32)
    creator, allowed, other = s.states
    s.do(0, creator.set_config({"admission": {"keys": [allowed.me.hex()]}}))
    for i, x in enumerate(s.states):
        s.do(i, x.set_round(5))
    assert s.settle()
    for x in s.states:
        assert {m.key for m in x.members(s.now)} == {creator.me, allowed.me}
        assert not x.admitted(other.me)


def test_bans_by_run_writer_and_by_majority_vote():
    s = Swarm(5, seed=33)
    st = s.states
    s.do(0, st[0].ban(st[4].me, "sent NaNs"))
    s.do(1, st[1].vote_ban(st[3].me, "slow"))
    s.do(2, st[2].vote_ban(st[3].me, "slow"))
    assert s.settle()
    # 2 votes of 4 voting members (the banned one does not vote) is not a majority.
    assert set(st[1].bans()) == {st[4].me}
    s.do(0, st[0].vote_ban(st[3].me, "slow"))
    assert s.settle()
    for x in st:
        bans = x.bans()
        assert set(bans) == {st[3].me, st[4].me}
        assert "sent NaNs" in bans[st[4].me] and "voted out" in bans[st[3].me]
        assert {m.key for m in x.members(s.now)} == {st[0].me, st[1].me, st[2].me}
    s.do(1, st[1].withdraw_vote(st[3].me))
    assert s.settle()
    assert set(st[2].bans()) == {st[4].me}


def test_liveness_follows_heartbeats_from_the_local_failure_detector():
    s = Swarm(3, seed=34)
    assert s.settle()
    quiet = s.states[2]
    s.net.nodes.pop(quiet.me)  # it stops talking
    s.states = s.states[:2]
    watcher = s.states[0]
    s.run(10)
    assert {m.key: m.liveness for m in watcher.members(s.now)}[quiet.me] == Liveness.ALIVE
    s.run(SUSPECT_AFTER_S, 5.0)
    assert {m.key: m.liveness for m in watcher.members(s.now)}[quiet.me] == Liveness.SUSPECT
    s.run(DEAD_AFTER_S - SUSPECT_AFTER_S, 5.0)
    live = {m.key: m.liveness for m in watcher.members(s.now)}
    assert live[quiet.me] == Liveness.DEAD and live[s.states[1].me] == Liveness.ALIVE


def test_metrics_travel_as_records_and_newest_wins():
    s = Swarm(2, seed=35)
    a, b = s.states
    a.set_metrics(loss=2.5, tput=100.0)
    s.run(12)
    a.set_metrics(loss=2.25)
    s.run(12)
    assert s.settle()
    assert {m.key: m.metrics for m in b.members(s.now)}[a.me] == {"loss": 2.25, "tput": 100}


def test_documents_stay_bounded_over_many_writes_and_heartbeats():
    s = Swarm(2, seed=36)
    a, b = s.states
    sizes = []
    for r in range(1, 2001):
        s.do(0, a.set_round(r))
        if r % 10 == 0:
            s.do(0, a.heartbeat(s.now + r))
            s.net.deliver(s.now)
        if r % 500 == 0:
            sizes.append(b.size_bytes())
    assert s.settle()
    own = a.docs[(KIND_PEER, a.me)]
    assert own.seq <= COMPACT_AFTER_ENTRIES < MAX_CHAIN_ENTRIES
    assert {m.key: m.round for m in b.members(s.now)}[a.me] == 2000
    assert max(sizes) < 2 * min(sizes), sizes  # compaction keeps the chain, hence the state, bounded
