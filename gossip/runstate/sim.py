"""An in-process network of `RunState`s for tests and benchmarks: delivery can be shuffled,
duplicated, dropped and partitioned, and every byte sent is counted."""

import random
from collections import Counter
from collections.abc import Iterable

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
        for k, s in self.nodes.items():
            peers = [p for p in self.nodes if p != k and self.reachable(k, p)]
            self.send(k, s.tick(now, peers))

    def converged(self) -> bool:
        """Every replica holds the same chains, records and proofs."""
        digests = [s._digests() for s in self.nodes.values()]
        return all(d == digests[0] for d in digests)
