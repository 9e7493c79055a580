"""What the daemon does with its worker's partner-guard verdicts, and with the run's exclusions (issue 18).

The worker judges each partner's message (gossip/outer/guard.py) and sends the verdict. Here it is logged
and emitted as a `verdict` event; each strike (a refusal by a rule whose word holds alone) and, when the
guard excluded the partner (refused again and again), the evidence go into this peer's signed run-state
document (`RunState.report_strike`, `RunState.accuse`). The run state turns a quorum
of members' evidence into exclusions every member computes alike (`RunState.excluded`); `excluded()` is
what the round swap leaves out of the pairing, and the daemon says when the run excludes a peer, and when
an exclusion lapses. Silence evidence (peer/silence.py) takes the same road.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shoal.peer.events import Events
from shoal.peer.runstate_link import RunStateLink, key_of, peer_id_of
from shoal.transport.lograte import LogThrottle

log = logging.getLogger("shoal.peer.daemon")


class GuardReports:
    def __init__(self, peer_id: str, events: Events, runstate: Callable[[], RunStateLink | None]) -> None:
        self.peer_id = peer_id
        self.events = events
        self._runstate = runstate  # the daemon's link, once it is up
        self._told: set[str] = set()  # peers excluded when we last looked (said once per exclusion)
        self._lines = LogThrottle(log)

    def on_verdict(self, message: dict[str, Any]) -> None:
        """The worker's guard judged this round's partner: say so, and publish the evidence when it excluded
        the partner."""
        fields = {k: message.get(k) for k in ("round", "peer", "action", "reason", "weight", "strikes")}
        self.events.emit("verdict", **fields, scores=message.get("scores"))
        peer, action = str(message.get("peer")), message.get("action")
        if action != "accept":
            verb = "refused" if action == "refuse" else "clipped"
            log.info(
                "[%s] round %s: the guard %s %s's update (%s, weight %s)",
                *(self.peer_id, fields["round"], verb, peer, fields["reason"], fields["weight"]),
            )
        key = key_of(peer)  # the partner's id, as the daemon told the worker: a valid peer id
        link = self._runstate()
        if key is None or link is None:
            return
        number = int(message.get("round") or 0)
        if message.get("struck"):  # one strike: the run adds up its members' (gossip/runstate/evidence.py)
            link.change("report_strike", key, number, f"guard: {fields['reason']}")
        if message.get("excluded"):
            why = f"guard: {message.get('why') or str(fields['strikes']) + ' strikes'}"
            log.warning("[%s] %s sent poisoned updates (%s): publishing the evidence", self.peer_id, peer,
                        why)  # fmt: skip
            link.change("accuse", key, number, why)

    def excluded(self) -> set[str]:
        """Peers no member pairs with: excluded on its members' published evidence, or banned from the run
        (by its creator or a delegate, for proven equivocation, or by a majority vote of its members)."""
        link = self._runstate()
        return set() if link is None else {str(peer_id_of(key)) for key in self._reasons(link)}

    @staticmethod
    def _reasons(link: RunStateLink) -> dict[bytes, str]:
        return {**link.state.bans(), **link.state.excluded()}

    def flush_logs(self) -> None:
        self._lines.flush()

    def note_exclusions(self, number: int) -> None:
        """Says, in the log and as an `excluded` event, when the run excludes or bans a peer, and when an
        exclusion lapses (evidence ages out) and the run pairs the peer again."""
        link = self._runstate()
        if link is None:
            return
        now = {str(peer_id_of(key)): why for key, why in self._reasons(link).items()}
        # Every change is an event; the log says the first few a minute, then sums up (a crowd of silent
        # identities excluded one by one must not flood it).
        for peer, why in now.items():
            if peer not in self._told:
                self._lines.note(logging.WARNING, "the run excluded a peer from pairing", peer,
                                 f"round {number}: {why}")  # fmt: skip
                self.events.emit("excluded", round=number, peer=peer, reason=why)
        for peer in sorted(self._told - set(now)):
            self._lines.note(logging.INFO, "the run pairs a peer again (its exclusion lapsed)", peer,
                             f"round {number}")  # fmt: skip
            self.events.emit("readmitted", round=number, peer=peer)
        self._told = set(now)
