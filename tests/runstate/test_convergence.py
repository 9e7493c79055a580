"""Replicas given the same changes in any order, with duplicates and healed partitions, end equal."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shoal.gossip.runstate.sim import Swarm, fingerprint

# (writer, operation, argument): operations every peer can do, plus the creator's run changes.
OPS = st.tuples(
    st.integers(0, 4),
    st.sampled_from(
        ["addrs", "round", "vote", "refuse", "metrics", "config", "checkpoint", "ban", "burst", "restart"]
    ),
    st.integers(0, 1000),
)


def apply_op(s: Swarm, writer: int, op: str, arg: int) -> None:
    st_ = s.states[writer]
    other = s.states[arg % len(s.states)].me
    if op == "addrs":
        s.do(
            writer, st_.set_member(addrs=[f"/ip4/10.0.{writer}.{arg % 250}/tcp/4001"], caps={"gpu": arg % 3})
        )
    elif op == "round":
        s.do(writer, st_.set_round(arg))
    elif op == "vote":
        s.do(writer, st_.vote_ban(other, f"slow {arg}") if arg % 2 else st_.withdraw_vote(other))
    elif op == "refuse":
        s.do(writer, st_.refuse_peer(other, "unreachable"))
    elif op == "burst":  # enough writes in a row to make the owner compact into a new generation
        for r in range(12):
            s.do(writer, st_.set_round(arg + r))
    elif op == "restart":  # a new process: new generation, new Yjs client id, same content
        s.restart(writer)
    elif op == "metrics":
        st_.set_metrics(loss=arg / 100, tput=float(arg))
        s.do(writer, st_.heartbeat(s.now))
    elif writer == 0 and op == "config":
        s.do(0, st_.set_config({"lr": arg / 1000, "batch": arg % 64}))
    elif writer == 0 and op == "checkpoint":
        s.do(0, st_.add_checkpoint(f"{arg:064x}", arg, 10 * arg, [{"name": "w.pt", "size": arg}]))
    elif writer == 0 and op == "ban":
        s.do(0, st_.ban(other, "test") if arg % 3 else st_.unban(other))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The creator bans the other peer, then itself (arg 2: ban, other = states[2 % 2]): every key was banned.
@example(
    n=2,
    seed=0,
    ops=[(0, "addrs", 0)] * 14 + [(0, "ban", 1), (0, "ban", 2)],
    partition_at=0,
    heal_at=0,
    deliver_every=1,
    duplicate=0.0,
)
@given(
    n=st.integers(2, 5),
    seed=st.integers(0, 2**32),
    ops=st.lists(OPS, min_size=1, max_size=40),
    partition_at=st.integers(0, 40),
    heal_at=st.integers(0, 40),
    deliver_every=st.integers(1, 6),
    duplicate=st.sampled_from([0.0, 0.3]),
)
def test_replicas_converge_after_any_order_duplicates_and_partitions(
    n, seed, ops, partition_at, heal_at, deliver_every, duplicate
):
    s = Swarm(n, seed, duplicate=duplicate)
    keys = [x.me for x in s.states]
    for i, (writer, op, arg) in enumerate(ops):
        if i == partition_at:
            cut = 1 + seed % (n - 1) if n > 1 else 1
            s.net.partition([keys[:cut], keys[cut:]])
        if i == max(heal_at, partition_at + 1):
            s.net.heal()
        apply_op(s, writer % n, op, arg)
        if i % deliver_every == 0:
            # Deliver part of what is queued, in shuffled order; the rest waits and mixes with later writes.
            s.net.deliver(s.now, max_messages=len(s.net.queue) // 2)
            s.run(1.0)
    s.net.heal()
    assert s.settle(), "replicas did not converge after the partition healed"
    prints = [fingerprint(x, s.now) for x in s.states]
    assert all(p == prints[0] for p in prints[1:])
    # Each peer's document as every replica sees it is what its owner wrote.
    for owner in s.states:
        for kind_owner, replica in owner.docs.items():
            if kind_owner[1] == owner.me:
                for other in s.states:
                    assert other.docs[kind_owner].read() == replica.read()


def test_creator_banning_everyone_including_itself_keeps_anti_entropy_going():
    s = Swarm(2, seed=0)
    creator, other = s.states
    s.do(0, creator.ban(other.me, "test"))
    s.do(0, creator.ban(creator.me, "test"))
    assert s.settle()
    s.run(60)  # heartbeats signed after the bans must still spread
    assert s.settle()
    for x in s.states:
        assert set(x.bans()) == {other.me}  # the creator cannot be banned through the run document
        assert creator.me in x.gossip_peers() or x is creator
        assert x.records[creator.me].counter == creator.records[creator.me].counter


def test_converged_replicas_agree_on_what_was_written():
    s = Swarm(4, seed=7, duplicate=0.5)
    s.do(0, s.states[0].set_config({"lr": 0.25, "admission": {"open": True}}))
    s.do(0, s.states[0].add_checkpoint("ab" * 32, 12, 1000, ["shard-0"]))
    s.do(0, s.states[0].add_checkpoint("cd" * 32, 30, 1000, ["shard-0"]))
    for i, st_ in enumerate(s.states):
        s.do(i, st_.set_member(addrs=[f"/ip4/10.0.0.{i}/tcp/1"]))
        s.do(i, st_.set_round(100 + i))
    assert s.settle()
    for st_ in s.states:
        assert st_.config() == {"lr": 0.25, "admission": {"open": True}}
        assert st_.manifest().hash == "cd" * 32 and st_.manifest().round == 30
        members = {m.key: m for m in st_.members(s.now)}
        assert set(members) == {x.me for x in s.states}
        for i, x in enumerate(s.states):
            assert members[x.me].addrs == [f"/ip4/10.0.0.{i}/tcp/1"]
            assert members[x.me].round == 100 + i
