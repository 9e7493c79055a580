"""Partners that stay in the run but never answer (issue 16): noted after the round they left us waiting in,
reported to the run once their signed heartbeats went on in the same life.

A round whose partner gave no sign at all (no status answer, no offer, no reply to ours: a silent daemon or
an address where nothing answers) is noted here. After `confirm_s` (twice the membership's failure time) the
partner is accused (`RunState.report_silence`) only if it is still live with heartbeats of the same life:
a peer that crashed stops beating and is not accused, and one that restarted beats from a new incarnation
(a wall-clock millisecond count, a jump no life's own beats make), so it is not accused either. A quorum
of members' accusations excludes the peer from pairing for a while (gossip/runstate/evidence.py); one
accuser alone excludes nobody, so a broken link between two honest peers costs nothing more than it did.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from shoal.gossip.membership import Membership
from shoal.transport.lograte import LogThrottle

log = logging.getLogger("shoal.peer.daemon")

MAX_NOTED = 64  # partners awaiting confirmation; the oldest go first (one partner a round: rarely more)
# After we accused a partner, a round that pairs us with it again (in the same life) is skipped at once
# for this long, rather than costing its dial or the silence cut again: the run's exclusion needs a quorum,
# and until it has one, a crowd of silent identities would otherwise cost us seconds in most rounds. We
# still answer its status, so an honest peer we misjudged sees at once that we will not offer.
FAST_SKIP_S = 120.0
# Heartbeats one life can add per second (a beat per gossip tick and per finished round; rounds take at
# least tenths of a second); a restart jumps by about the milliseconds its previous life lasted.
MAX_BEATS_PER_S = 100.0


@dataclass
class _Noted:
    round: int
    heartbeat: int
    since: float
    why: str


class SilenceWatch:
    def __init__(
        self,
        peer_id: str,
        membership: Callable[[], Membership | None],
        report: Callable[[str, int, str], None],
        confirm_s: float,
    ) -> None:
        self.peer_id = peer_id
        self._membership = membership
        self._report = report  # report(partner, round, why): publish the accusation
        self.confirm_s = confirm_s
        self._noted: OrderedDict[str, _Noted] = OrderedDict()
        self._lines = LogThrottle(log)
        self._accused: OrderedDict[str, _Noted] = OrderedDict()  # when, and at which heartbeat

    def accused(self, partner: str, now: float) -> bool:
        """Whether we accused `partner` within FAST_SKIP_S, and it has not restarted since."""
        done, members = self._accused.get(partner), self._membership()
        entry = members.members.get(partner) if members is not None else None
        if done is None or entry is None or now - done.since > FAST_SKIP_S:
            return False
        return entry.heartbeat - done.heartbeat <= MAX_BEATS_PER_S * (now - done.since) + 1

    def flush_logs(self) -> None:
        self._lines.flush()

    def note(self, partner: str, round_: int, why: str, now: float) -> None:
        """`partner` gave no sign of life in our round `round_`."""
        if self.accused(partner, now):
            return  # published already; its round was skipped without waiting
        members = self._membership()
        entry = members.members.get(partner) if members is not None else None
        if entry is None or entry.left:
            return
        earlier = self._noted.pop(partner, None)
        if earlier is not None:  # silent again before its confirmation: the first note's clock runs on
            earlier.round, earlier.why = round_, why
            self._noted[partner] = earlier
        else:
            self._noted[partner] = _Noted(round_, entry.heartbeat, now, why)
        while len(self._noted) > MAX_NOTED:
            self._noted.popitem(last=False)

    def check(self, now: float) -> None:
        """Accuses the noted partners whose confirmation time is up and whose same life still beats."""
        members = self._membership()
        if members is None:
            return
        for partner, noted in list(self._noted.items()):
            waited = now - noted.since
            if waited < self.confirm_s:
                continue
            del self._noted[partner]
            entry = members.members.get(partner)
            if entry is None or not members.is_live(partner, now):
                continue  # it crashed or left: gone, not silent
            if not 0 < entry.heartbeat - noted.heartbeat <= MAX_BEATS_PER_S * waited + 1:
                continue  # a new life (it restarted), or no beat since: nothing proves it stayed
            why = f"{noted.why}; still in the run {waited:.0f} s later"
            # A few lines a minute, then one summary: a crowd of silent identities must not flood the log.
            self._lines.note(logging.WARNING, "published a member that stays in the run but never answered",
                             partner, f"round {noted.round}: {why}")  # fmt: skip
            self._report(partner, noted.round, why)
            self._accused.pop(partner, None)
            self._accused[partner] = _Noted(noted.round, entry.heartbeat, now, why)
            while len(self._accused) > MAX_NOTED:
                self._accused.popitem(last=False)
