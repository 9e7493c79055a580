"""Which round a peer swaps in: its own next one while it keeps pace, the run's when it did not.

Two partners swap only when both are in the same round (the pairing is a function of the round number),
so the peers of a run must agree on it. Swapping keeps a pair in step; a skipped round does not: a peer
whose partner is gone, or that sits out, finishes its round sooner than those that swap, and a peer that
waited for a partner until the deadline finishes it later. Left alone, one that is ahead keeps skipping
(its partners refuse offers that far ahead) and so runs further ahead, faster, with nobody to swap with.

So after a skipped round (and for the first one) a peer asks a few members, and its partner in its next
round, which round they finished and which they are in. The run's round is the median of the finished
rounds, plus one: a minority of liars moves it nowhere. Behind the run, the peer jumps to the run's
round, unless its partner has yet to swap the peer's round (it waits for us: stay). Ahead of the run by
more than partners hold offers for, it waits for the run to catch up (bounded by a deadline), as
stale-synchronous training bounds how far one worker may lead, or until its partner is in its round;
after a wait it asks once more, as the run may have gone past it meanwhile. Sans-I/O: the shell gathers
the answers and does the waiting.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from shoal.gossip.rounds.swap import MAX_ROUNDS_AHEAD

# Members asked for the round they finished after a skipped round: enough that one liar is outvoted.
ROUND_SAMPLE = 5


def run_round(finished: Iterable[int]) -> int | None:
    """The run's current round from the rounds members say they finished; None with no answer.

    The lower median: a peer jumps only when at least half of those asked are past its round, not
    because one of two members sat a round out and finished it early (in a small run that would pull
    everyone forward, each jump skipping the round its partner is in), nor for a liar among two."""
    answers = sorted(n for n in finished if n >= 0)
    return statistics.median_low(answers) + 1 if answers else None


def next_round(proposed: int, run: int | None, last: int | None = None, partner_waits: bool = False) -> int:
    """The round to swap in: the worker's next one, or the run's if that is further on, but never past
    `last`, the run's final round when it has one (the others have stopped by then).

    Not while our partner in the worker's round waits for us (`partner_waits`): a peer one round behind
    because its inner steps got less of a loaded machine's cores than the others' would otherwise jump,
    and cost that partner its round as well as itself."""
    if run is None or partner_waits:
        return proposed
    return max(proposed, run if last is None else min(run, last))


def still_in(number: int, finished: int, here: int) -> bool:
    """Whether a partner that finished round `finished` and is in round `here` may still swap `number`."""
    return finished < number and here <= number


def lead(number: int, run: int | None, partner_here: int | None = None) -> int:
    """How many rounds `number` is ahead of the run by more than partners hold an offer for (0: none).

    0 while our partner in `number` is in that round (`partner_here`): it jumped to us and waits
    there, and what it finished, which is the run's round in a run of two, moves only once it swaps
    with us. Waiting on, the pair would meet only if our wait ended before its exchange deadline."""
    if run is None or partner_here == number:
        return 0
    return max(0, number - run - MAX_ROUNDS_AHEAD)
