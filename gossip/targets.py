"""Whom to gossip with (and ask) next: members that answered lately first, the rest at random, and none that
just failed us until its backoff is over.

Uniform choice over the live members is what epidemic gossip assumes, and what a crowd of members that
never answer (identities at silent addresses, each signing its own fresh heartbeats) turns into a stall:
each tick spends its timeout on one of them, honest heartbeats stop spreading, honest members presume
each other dead, and a member dead in a view is never picked again (measured: 50 such members among 4
honest peers stopped every swap, `bench.hostile --attacks silent_sybils`). So a gossip tick picks a live
member at random among those not backing off, as plain gossip does, and when that one has not answered
a request of ours within RECENT_S, swaps at once with one that has, dead in our view or not: honest
heartbeats keep spreading, and newcomers and members that recovered are still reached. A member that did
not answer is not tried again before a backoff that doubles with each failure in a row (BACKOFF_MIN_S up
to BACKOFF_MAX_S). Asking a few members (the round clock's sample) picks a responsive one with
RESPONSIVE_SHARE.
Sans-I/O: the caller says who answered and who failed, and when.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

RECENT_S = 30.0  # a member that answered within this long counts as responsive
RESPONSIVE_SHARE = 0.5  # of the choices, when any member is responsive
BACKOFF_MIN_S = 2.0
BACKOFF_MAX_S = 60.0


class GossipTargets:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        # member -> when it last answered a request of ours. Not when it pushed to us: a member that pushes
        # its table but never answers must not count as one that answers.
        self._answered: dict[str, float] = {}
        self._failed: dict[str, tuple[int, float]] = {}  # member -> (failures in a row, not tried before)

    def answered(self, peer: str, now: float) -> None:
        self._answered[peer] = now
        self._failed.pop(peer, None)

    def failed(self, peer: str, now: float) -> None:
        self._answered.pop(peer, None)
        failures = self._failed.get(peer, (0, 0.0))[0] + 1
        self._failed[peer] = (failures, now + min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (failures - 1)))

    def backing_off(self, peer: str, now: float) -> bool:
        """Whether `peer` failed to answer us lately and its backoff is not over."""
        return self._failed.get(peer, (0, 0.0))[1] > now

    def responsive(self, peer: str, now: float) -> bool:
        return now - self._answered.get(peer, float("-inf")) < RECENT_S

    def tick(self, live: Sequence[str], known: Sequence[str], now: float) -> list[str]:
        """This gossip tick's targets, swapped with at once: a live member at random among those not
        backing off (among all live ones when all are) and, when that one has not answered lately, also
        one that has, from every member we know (answering is how a member presumed dead in our view
        comes back: a view that only picks live members would never revive one). In a run where everyone
        answers that is one swap a tick, as plain gossip; none when we know no member."""
        # A backoff only puts a member last: when every live member is backing off (a small run under
        # load, whose members time out on each other), gossip goes on with them rather than starve.
        usable = [c for c in live if not self.backing_off(c, now)] or list(live)
        picked = [self.rng.choice(usable)] if usable else []
        if not picked or not self.responsive(picked[0], now):
            recent = [c for c in known if self.responsive(c, now) and c not in picked]
            if recent:
                picked.append(self.rng.choice(recent))
        return picked

    def sample(self, candidates: Sequence[str], k: int, now: float) -> list[str]:
        """Up to `k` distinct members to ask: each pick responsive with RESPONSIVE_SHARE (while any is
        left), else any member not backing off."""
        usable = [c for c in candidates if not self.backing_off(c, now)] or list(candidates)
        recent = [c for c in usable if self.responsive(c, now)]
        picked: list[str] = []
        while len(picked) < k and usable:
            pool = recent if recent and self.rng.random() < RESPONSIVE_SHARE else usable
            choice = self.rng.choice(pool)
            picked.append(choice)
            usable.remove(choice)
            if choice in recent:
                recent.remove(choice)
        return picked

    def forget_all_but(self, members: Collection[str]) -> None:
        """Drops what is known of peers no longer members: bounded by the membership."""
        for book in (self._answered, self._failed):
            for peer in [p for p in book if p not in members]:
                del book[peer]
