"""Run state in CRDTs: gossip bytes at steady state, convergence after a partition heals, state size.

    python -m bench.runstate --peers 1000 --json PATH [--minutes 1] [--replicas 50] [--heartbeats 100000]

Runs the real sans-I/O `gossip.runstate.RunState` on `gossip.runstate.sim`'s in-process network:

1. steady state: `--peers` replicas of one run, all documents and records known, then `--minutes`
   simulated minutes of heartbeats (every 10 s) and anti-entropy (every 5 s, one partner): bytes sent
   per peer per minute. Baseline in the same run: shipping the full state on each of those anti-entropy
   exchanges instead of digests and differences.
2. partition heal: `--replicas` replicas split in two halves for 60 s while both sides write; then healed:
   simulated seconds until every replica holds the same document chains and proofs and the read API
   (config, manifest, bans, members) agrees everywhere. Heartbeat records are left out: a new one is
   signed somewhere every 200 ms, so they are never all equal at one instant.
   Baseline in the same run: the same scenario with pushes only (no anti-entropy).
3. state size: one replica's replicated state (chains, records) before and after `--heartbeats`
   signed heartbeats from the peers of part 1; then after a tenth as many more, each with a document
   write (the round reached), which compaction keeps bounded.

Simulated time is the protocol's; wall time is this machine's (shared CPU: noisy). To fit a thousand
replicas in one process, identical envelope bytes are decoded and signature-checked once per process
as are the pure per-entry steps every replica repeats (reading a Yjs update, hashing an entry's id);
each replica still runs every other check. This changes CPU time only, never a byte on the wire.
"""

import argparse
import functools
import json
import random
import signal
import sys
import time

from shoal.gossip.runstate import RunState, docs, envelope, state
from shoal.gossip.runstate.limits import ANTI_ENTROPY_INTERVAL_S
from shoal.gossip.runstate.sim import Swarm, fingerprint

WALL_CLOCK_GUARD_S = 1500  # the whole benchmark; a stuck run is killed, not waited on
T0 = 1_700_000_000.0
WARMUP_S = 30.0  # simulated seconds for records and exchanges to reach their steady pattern
PARTITION_S = 60.0
HEAL_LIMIT_S = 600.0


def _memoize_decoding() -> None:
    """Decode and verify identical bytes once per process (see the module docstring)."""
    for cls in (envelope.Entry, envelope.MetricsRecord):
        decode = functools.lru_cache(maxsize=1 << 18)(cls.decode.__func__)
        cls.decode = classmethod(
            lambda c, data, run_id, verify=True, _d=decode: _d(c, bytes(data), run_id, verify=verify)
        )
    # The same for the pure per-entry work every replica repeats: reading the Yjs update, the entry id.
    docs.parse = functools.lru_cache(maxsize=1 << 18)(docs.parse)
    envelope.Entry.id = functools.lru_cache(maxsize=1 << 20)(envelope.Entry.id)
    check = functools.lru_cache(maxsize=1 << 18)(envelope._verify)
    for cls in (envelope.Entry, envelope.MetricsRecord):
        cls.verify = lambda self, run_id, _c=check: _c(self.owner, self.sig, self.signed_part(run_id), "item")


def steady_state(peers: int, minutes: float, seed: int) -> tuple[dict, list[RunState]]:
    t = time.perf_counter()
    rng = random.Random(seed)
    swarm = Swarm(peers, seed)
    states = swarm.states
    creator = states[0]
    creator.set_config({"model": "gpt-small", "lr": 0.0007, "admission": {"open": True}})
    creator.add_checkpoint("ab" * 32, 0, 1 << 30, [{"name": "model.pt", "sha256": "cd" * 32}])
    own = []
    for i, s in enumerate(states):
        s.set_member(addrs=[f"/ip4/10.{i // 250}.{i % 250}.1/tcp/4001"], caps={"gpus": 1, "mem_gb": 80})
        s.set_round(0)
        s.heartbeat(swarm.now)
        own.append(([e for r in s.docs.values() if r.owner == s.me for e in r.entries], s.records[s.me]))
    # Warm start: every replica learns every document and record directly (what anti-entropy would do).
    for s in states:
        for entries, rec in own:
            if entries[0].owner != s.me:
                for e in entries:
                    s._accept(e, swarm.now)
                s._accept_record(rec, swarm.now)
    net = swarm.net
    setup_s = time.perf_counter() - t
    swarm.run(WARMUP_S)
    net.sent_bytes.clear()
    net.sent_messages = 0
    for s in states:
        s.set_metrics(loss=rng.random() * 4, tput=rng.random() * 1e5)
    t = time.perf_counter()
    swarm.run(60.0 * minutes)
    sim_s = time.perf_counter() - t
    per_peer_min = sum(net.sent_bytes.values()) / peers / minutes
    full_state = states[1].size_bytes()
    exchanges_per_min = 60.0 / ANTI_ENTROPY_INTERVAL_S
    # Full-state anti-entropy: each peer starts that many exchanges a minute, each answered with the
    # whole state, and answers as many started by others.
    naive = 2 * exchanges_per_min * full_state
    return {
        "gossip_bytes_per_peer_per_min": round(per_peer_min),
        "messages_per_peer_per_min": round(net.sent_messages / peers / minutes, 1),
        "baseline_full_state_bytes_per_peer_per_min": round(naive),
        "ratio_vs_full_state": round(per_peer_min / naive, 4),
        "full_state_bytes": full_state,
        "setup_wall_s": round(setup_s, 1),
        "simulated_minutes": minutes,
        "wall_s": round(sim_s, 1),
    }, states


def heal(replicas: int, seed: int, anti_entropy: bool) -> dict:
    swarm = Swarm(replicas, seed + 1, duplicate=0.1)
    states = swarm.states
    if not anti_entropy:
        for s in states:
            s._next_ae = float("inf")
    swarm.do(0, states[0].set_config({"lr": 0.001}))
    for i, s in enumerate(states):
        swarm.do(i, s.set_member(addrs=[f"/ip4/10.0.{i}.1/tcp/4001"]))
    swarm.run(60.0)
    keys = [s.me for s in states]
    half = replicas // 2
    swarm.net.partition([keys[:half], keys[half:]])
    for r in range(1, 6):  # both sides keep working: rounds, config, votes
        for i, s in enumerate(states):
            swarm.do(i, s.set_round(r))
        swarm.do(0, states[0].set_config({"lr": 0.001 / (r + 1)}))
        swarm.do(half, states[half].vote_ban(keys[1], "slow"))
        swarm.run(PARTITION_S / 5)
    swarm.net.heal()
    healed_at = swarm.now
    t = time.perf_counter()
    converged = False
    while swarm.now - healed_at < HEAL_LIMIT_S:
        swarm.run(1.0)
        if swarm.net.converged(records=False):
            prints = [fingerprint(s, swarm.now, records=False) for s in states]
            converged = all(p == prints[0] for p in prints[1:])
            break
    return {
        "converged": converged,
        "heal_converge_s": round(swarm.now - healed_at, 1) if converged else None,
        "wall_s": round(time.perf_counter() - t, 1),
    }


def heartbeat_growth(states: list[RunState], heartbeats: int, seed: int) -> dict:
    """One replica's state size: after `heartbeats` signed heartbeats from random peers, then after
    `heartbeats // 10` more, each with a document write (the round reached)."""
    rng = random.Random(seed + 2)
    observer = states[1]
    writers = states[2:]
    now = T0 + 10_000.0
    start = observer.size_bytes()
    t = time.perf_counter()

    def feed(n: int, write_every: int) -> None:
        nonlocal now
        for i in range(n):
            w = rng.choice(writers)
            now += 0.01
            w.set_metrics(loss=rng.random(), tput=rng.random() * 1e5)
            outs = w.heartbeat(now)
            if write_every and i % write_every == 0:
                outs += w.set_round(i)
            for data in {o.data for o in outs}:  # each distinct message once
                observer.on_message(w.me, data, now)

    feed(heartbeats, 0)
    after = observer.size_bytes()
    feed(heartbeats // 10, 1)
    return {
        "state_bytes_start": start,
        "state_bytes_after_heartbeats": after,
        "state_bytes_after_heartbeats_with_round_writes": observer.size_bytes(),
        "heartbeats": heartbeats,
        "round_writes": heartbeats // 10,
        "longest_chain_entries": max(r.seq for r in observer.docs.values()),
        "wall_s": round(time.perf_counter() - t, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=1.0, help="simulated minutes measured at steady state")
    ap.add_argument("--replicas", type=int, default=50, help="replicas in the partition-heal test")
    ap.add_argument("--heartbeats", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    if args.peers < 3:
        ap.error("--peers must be at least 3")

    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"bench.runstate: over {WALL_CLOCK_GUARD_S} s; killed"))
    signal.alarm(WALL_CLOCK_GUARD_S)
    state.log.setLevel("ERROR")
    _memoize_decoding()
    print(f"runstate: {args.peers} peers, {args.minutes} simulated min (shared CPU: wall times are noisy)")
    steady, states = steady_state(args.peers, args.minutes, args.seed)
    print(
        f"  steady state: {steady['gossip_bytes_per_peer_per_min']:,} B/peer/min "
        f"({steady['messages_per_peer_per_min']} messages); full-state anti-entropy would send "
        f"{steady['baseline_full_state_bytes_per_peer_per_min']:,} B: "
        f"ratio {steady['ratio_vs_full_state']:.4f}"
        f"  [setup {steady['setup_wall_s']} s, run {steady['wall_s']} s wall]"
    )
    healed = heal(args.replicas, args.seed, anti_entropy=True)
    push_only = heal(args.replicas, args.seed, anti_entropy=False)
    print(
        f"  partition heal, {args.replicas} replicas: converged {healed['converged']} after "
        f"{healed['heal_converge_s']} simulated s ({healed['wall_s']} s wall); push only (no anti-entropy): "
        f"converged {push_only['converged']} within {HEAL_LIMIT_S:.0f} s"
    )
    growth = heartbeat_growth(states, args.heartbeats, args.seed)
    ratio = growth["state_bytes_after_heartbeats"] / growth["state_bytes_start"]
    print(
        f"  state size: {growth['state_bytes_start']:,} B -> {growth['state_bytes_after_heartbeats']:,} B "
        f"after {args.heartbeats:,} heartbeats (x{ratio:.3f}); "
        f"{growth['state_bytes_after_heartbeats_with_round_writes']:,} B after "
        f"{growth['round_writes']:,} more with a round write each "
        f"(longest chain {growth['longest_chain_entries']} entries) "
        f"[{growth['wall_s']} s wall]"
    )
    doc = {
        "gossip_bytes_per_peer_per_min": steady["gossip_bytes_per_peer_per_min"],
        "heal_converge_s": healed["heal_converge_s"],
        "converged": healed["converged"],
        "state_bytes_start": growth["state_bytes_start"],
        "state_bytes_after_100k_heartbeats": growth["state_bytes_after_heartbeats"],
        "peers": args.peers,
        "steady_state": steady,
        "heal": healed,
        "heal_push_only_baseline": push_only,
        "heartbeat_growth": growth,
        "note": "shared 2-core CPU: wall times are noisy; simulated seconds and bytes are not",
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
