"""The round protocol's rules, without I/O: who may swap with us in which round, and what we answer.

Each round, both partners send an OFFER (round, their payload) to each other at once (full duplex), and
each answers the other's with a short ACCEPT or a REFUSE with a reason. A peer may receive its partner's
offer before its own payload is ready; it holds it (the shell waits, under a deadline). A peer waiting
for its partner's offer asks it for a STATUS now and then, to stop waiting early when the partner is
gone, has moved past the round, or paired with someone else.

A round's exchange completes at most once: the first validated payload from the right partner wins,
everything else for that round is refused. Nothing here touches weights: the shell hands a complete,
validated payload to the worker, or nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Offers for rounds further ahead than this are refused: a peer that far ahead is not in step with us,
# and holding them would let one peer pin our memory with payloads for rounds we may never reach.
MAX_ROUNDS_AHEAD = 2


class Verdict(enum.Enum):
    HOLD = "hold"  # not ready for that round yet: wait, then ask again
    ACCEPT = "accept"  # take the payload: our own travels in our own offer
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


@dataclass
class RoundSlot:
    number: int
    partner: str | None
    done: bool = False


@dataclass
class SwapBook:
    """Per-peer state of the round protocol: the rounds we are ready for and those already swapped."""

    peer_id: str
    current: RoundSlot | None = None
    last_finished: int = 0
    completed: set[int] = field(default_factory=set)

    def ready(self, number: int, partner: str | None) -> None:
        """Our payload for round `number` exists and our view of the run named `partner`."""
        self.current = RoundSlot(number, partner)

    def finish(self, number: int) -> None:
        self.last_finished = max(self.last_finished, number)
        self.completed.discard(number)
        if self.current and self.current.number == number:
            self.current = None

    @property
    def here(self) -> int:
        """The round we are in: the one we are ready for, else the one after the last we finished (a peer
        that jumped to the run's round is ready for a round further on than that)."""
        return self.current.number if self.current else self.last_finished + 1

    def on_offer(self, sender: str, number: int) -> Decision:
        here = self.here
        if number <= self.last_finished:
            return Decision(Verdict.REFUSE, f"round {number} is over here (at round {here})")
        if self.current is None or self.current.number < number:
            if number > here + MAX_ROUNDS_AHEAD:
                return Decision(Verdict.REFUSE, f"round {number} is too far ahead of {here}")
            return Decision(Verdict.HOLD)
        if self.current.number > number:
            return Decision(Verdict.REFUSE, f"round {number} is over here")
        if self.current.partner != sender:
            return Decision(Verdict.REFUSE, f"my partner in round {number} is {self.current.partner}")
        if number in self.completed:
            return Decision(Verdict.REFUSE, f"round {number} was already swapped")
        return Decision(Verdict.ACCEPT)

    def complete(self, number: int) -> bool:
        """Marks round `number` swapped; False if it already was (a second payload is never used)."""
        if number in self.completed:
            return False
        self.completed.add(number)
        return True

    def status(self, number: int) -> dict:
        """What a partner waiting for us in round `number` needs to know."""
        slot = self.current if self.current is not None and self.current.number == number else None
        return {
            "round": self.here,
            "finished": self.last_finished,
            "partner": slot.partner if slot is not None else None,
            "ready": slot is not None,
        }


def should_stop_waiting(status: dict, me: str, number: int) -> str | None:
    """Given our partner's STATUS while we wait for its offer in round `number`: a reason to give up."""
    finished = status.get("finished")
    if isinstance(finished, int) and finished >= number:
        return f"partner already finished round {number}"
    here = status.get("round")
    if isinstance(here, int) and here > number:  # it jumped to the run's round, past ours
        return f"partner is in round {here}, past round {number}"
    if status.get("ready") and here == number and status.get("partner") != me:
        return f"partner paired with {status.get('partner')} in round {number}"
    return None
