"""An in-process network of `RunState`s for tests and benchmarks: delivery can be shuffled,
duplicated, dropped and partitioned, and every byte sent is counted."""

import random
from collections import Counter
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .envelope import public_bytes
from .state import Outgoing, RunState


class SimNet:
    def __init__(
        self, states: Iterable[RunState], rng: random.Random, *, shuffle: bool = True, duplicate: float = 0.0
    ) -> None:
        self.nodes: dict[bytes, RunState] = {s.me: s for s in states}
        self.rng = rng
        self.shuffle = shuffle
        self.duplicate = duplicate
        self.queue: list[tuple[bytes, Outgoing]] = []
        self.groups: dict[bytes, int] | None = None  # partition: key -> group; None when healed
        self.sent_bytes: Counter[bytes] = Counter()
        self.sent_messages = 0
        for s in self.nodes.values():
            s.add_peers(self.nodes)

    def partition(self, groups: list[list[bytes]]) -> None:
        self.groups = {k: i for i, g in enumerate(groups) for k in g}

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: bytes, b: bytes) -> bool:
        return b in self.nodes and (self.groups is None or self.groups.get(a) == self.groups.get(b))

    def send(self, src: bytes, outs: Iterable[Outgoing]) -> None:
        for o in outs:
            self.sent_bytes[src] += len(o.data)
            self.sent_messages += 1
            if not self.reachable(src, o.dest):
                continue
            self.queue.append((src, o))
            if self.duplicate and self.rng.random() < self.duplicate:
                self.queue.append((src, o))

    def deliver(self, now: float, max_messages: int = 10_000_000) -> int:
        """Deliver queued messages (and the answers they cause) until none are left."""
        n = 0
        while self.queue and n < max_messages:
            i = self.rng.randrange(len(self.queue)) if self.shuffle else 0
            self.queue[i], self.queue[-1] = self.queue[-1], self.queue[i]
            src, o = self.queue.pop() if self.shuffle else self.queue.pop(0)
            n += 1
            if self.reachable(src, o.dest):
                self.send(o.dest, self.nodes[o.dest].on_message(src, o.data, now))
        return n

    def tick(self, now: float) -> None:
        for k, s in list(self.nodes.items()):
            # Partitioned: gossip only within reach, as a daemon gossips only over open connections.
            peers = (
                None if self.groups is None else [p for p in self.nodes if p != k and self.reachable(k, p)]
            )
            self.send(k, s.tick(now, peers))

    def converged(self, records: bool = True) -> bool:
        """Every replica holds the same chains and proofs (and, with `records`, the same records:
        with 50 peers heartbeating every 10 s, some record is almost always still spreading)."""
        digests = [s._digests() if records else s._digests()[:2] for s in self.nodes.values()]
        return all(d == digests[0] for d in digests)


class Swarm:
    """Replicas of one run on a `SimNet`, the first being the run's creator; keys come from `seed`."""

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        duplicate: float = 0.0,
        run_id: bytes = b"sim-run",
        start: float = 1_700_000_000.0,
    ) -> None:
        rng = random.Random(seed)
        self.keys = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(n)]
        self.creator = public_bytes(self.keys[0])
        self.run_id = run_id
        self.now = start
        self.states = [
            RunState(k, run_id, self.creator, self.now, rng=random.Random(seed * 1000 + i))
            for i, k in enumerate(self.keys)
        ]
        self.net = SimNet(self.states, rng, duplicate=duplicate)

    def do(self, i: int, outs: Iterable[Outgoing]) -> None:
        self.net.send(self.states[i].me, outs)

    def restart(self, i: int) -> RunState:
        """Replica i restarts from what it saved (in memory here; `store` does the same with a file)."""
        old = self.states[i]
        new = RunState.restore(old.export(), self.keys[i], self.run_id, self.creator, self.now, rng=old.rng)
        new.add_peers(self.net.nodes)
        self.states[i] = self.net.nodes[new.me] = new
        return new

    def run(self, seconds: float, step: float = 1.0) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            self.net.tick(self.now)
            self.net.deliver(self.now)

    def settle(self, max_seconds: float = 300.0, step: float = 5.0) -> bool:
        """Run anti-entropy until every replica holds the same state; False if it never does."""
        end = self.now + max_seconds
        while self.now < end:
            self.run(step, step)
            if self.net.converged():
                return True
        return False


def fingerprint(state: RunState, now: float, records: bool = True) -> tuple:
    """Everything a user of the read API can see, plus the raw digests (records optional)."""
    return (
        state._digests() if records else state._digests()[:2],
        {k: r.read() for k, r in sorted(state.docs.items())},
        sorted(state.records.items()) if records else None,
        state.config(),
        state.checkpoints(),
        state.bans(),
        [(m.key, m.addrs, m.caps, m.round, m.metrics if records else None) for m in state.members(now)],
    )
