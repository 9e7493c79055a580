"""A restart keeps the state, keeps writing, and never writes under a Yjs client id it used before."""

import random

from shoal.gossip.runstate import KIND_PEER, store
from shoal.gossip.runstate.sim import Swarm


def restart(s: Swarm, i: int, directory) -> None:
    """Replace replica i with the one loaded from `directory`, as a restarted process would."""
    old = s.states[i]
    new = store.load(directory, s.keys[i], s.run_id, s.creator, s.now, rng=random.Random(99))
    store.save(new, directory)
    s.states[i] = new
    s.net.nodes[new.me] = new
    new.add_peers(s.net.nodes)
    assert new.me == old.me


def test_restart_keeps_state_and_keeps_writing(tmp_path):
    s = Swarm(3, seed=21)
    s.do(0, s.states[0].set_config({"lr": 0.1}))
    s.do(2, s.states[2].set_member(addrs=["/ip4/10.0.0.2/tcp/1"], caps={"gpu": "h100"}))
    s.do(2, s.states[2].set_round(41))
    s.do(2, s.states[2].vote_ban(s.states[1].me, "slow"))
    assert s.settle()
    old = s.states[2]
    old_gen = old.docs[(KIND_PEER, old.me)].gen
    old_client = old.docs[(KIND_PEER, old.me)].client
    store.save(old, tmp_path)
    s.run(30)  # time passes while it is down
    restart(s, 2, tmp_path)
    new = s.states[2]
    own = new.docs[(KIND_PEER, new.me)]
    assert own.gen > old_gen and own.client != old_client
    assert own.read()["member"]["round"] == 41
    assert new.config() == {"lr": 0.1}
    assert {m.key for m in new.members(s.now)} == {x.me for x in s.states}
    announced = new.announce()
    assert announced and all(o.dest != new.me for o in announced)
    s.do(2, announced)
    s.do(2, new.set_round(42))
    assert s.settle()
    for x in s.states:
        m = {m.key: m for m in x.members(s.now)}[new.me]
        assert (m.round, m.addrs, m.caps) == (42, ["/ip4/10.0.0.2/tcp/1"], {"gpu": "h100"})
        assert x.docs[(KIND_PEER, new.me)].gen == own.gen


def test_restart_with_lost_state_is_not_ignored(tmp_path):
    """Nothing on disk: the peer starts over, and its new writes win over its old generation."""
    s = Swarm(3, seed=22)
    s.do(1, s.states[1].set_round(7))
    assert s.settle()
    restart(s, 1, tmp_path / "empty")
    s.do(1, s.states[1].set_round(3))
    assert s.settle()
    for x in s.states:
        assert {m.key: m.round for m in x.members(s.now)}[s.states[1].me] == 3


def test_restart_with_a_clock_behind_moves_past_its_old_generation(tmp_path):
    """Lost state and a wall clock behind the old generation: the echo of its old chain pushes it past."""
    s = Swarm(3, seed=23)
    s.do(1, s.states[1].set_round(7))
    assert s.settle()
    s.now -= 3600  # the restarted machine's clock is an hour behind
    restart(s, 1, tmp_path / "empty")
    s.do(1, s.states[1].set_round(3))
    assert s.settle()
    for x in s.states:
        assert {m.key: m.round for m in x.members(s.now)}[s.states[1].me] == 3


def test_a_damaged_file_is_refused_with_a_clear_error(tmp_path):
    s = Swarm(1, seed=24)
    path = store.save(s.states[0], tmp_path)
    path.write_bytes(b"\xc1 not msgpack")
    try:
        store.load(tmp_path, s.keys[0], s.run_id, s.creator, s.now)
    except store.RunStateError as exc:
        assert str(path) in str(exc)
    else:
        raise AssertionError("a damaged file was loaded")
