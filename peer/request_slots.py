"""The run protocol's request slots, shared fairly between the peers that ask.

A request holds a slot from the moment its stream opens until its answer is written. Identities cost
nothing, so no peer may hold more than a few slots, and a full table never makes a newcomer wait: its
request evicts the oldest one still being read (an honest request arrives in milliseconds; one that is
still unread after a while is a stream parked to hold the slot). Pure bookkeeping: the daemon resets the
stream it is told to evict (a reset, not a task cancel: the request's reader then ends on a plain error,
and what it had read is freed at once rather than kept by a cancelled task's traceback until the cyclic
garbage collector runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

MAX_REQUESTS = 64  # inbound requests served at once
# One peer's requests at once: an offer, a status probe, a membership swap and a weights fetch may overlap.
MAX_REQUESTS_PER_PEER = 4

T = TypeVar("T")


@dataclass
class _Held(Generic[T]):
    peer: str
    since: float
    reading: bool = True  # still waiting for the request's bytes


@dataclass
class RequestSlots(Generic[T]):
    total: int = MAX_REQUESTS
    per_peer: int = MAX_REQUESTS_PER_PEER
    _held: dict[T, _Held[T]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, peer: str, holder: T, now: float | None = None) -> tuple[bool, T | None, str]:
        """(admitted, a holder to evict for it or None, why it was refused)."""
        now = time.monotonic() if now is None else now
        if sum(1 for h in self._held.values() if h.peer == peer) >= self.per_peer:
            return False, None, f"over {self.per_peer} requests at once from one peer"
        victim = None
        if len(self._held) >= self.total:
            reading = [(h.since, k) for k, h in self._held.items() if h.reading]
            if not reading:
                return False, None, f"all {self.total} request slots are answering requests"
            victim = min(reading, key=lambda item: item[0])[1]
            del self._held[victim]
        self._held[holder] = _Held(peer, now)
        return True, victim, ""

    def read(self, holder: T) -> None:
        """The request has arrived whole: from now on its slot is busy answering, not parked."""
        held = self._held.get(holder)
        if held is not None:
            held.reading = False

    def release(self, holder: T) -> None:
        self._held.pop(holder, None)
