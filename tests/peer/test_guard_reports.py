"""What the daemon publishes of its worker's guard verdicts (peer/guard_reports.py), on real run-state
replicas gossiping over the in-process network (gossip/runstate/sim.py): each strike goes into the peer's
signed document, and strikes by different members exclude their target everywhere (issue 18)."""

from __future__ import annotations

from typing import Any

from shoal.gossip.runstate.sim import Swarm
from shoal.gossip.runstate.state import RunState
from shoal.peer.events import Events
from shoal.peer.guard_reports import GuardReports
from shoal.peer.runstate_link import peer_id_of


class SimLink:
    """The part of the daemon's RunStateLink that GuardReports uses, on a replica of a simulated swarm."""

    def __init__(self, swarm: Swarm, index: int) -> None:
        self.swarm, self.index = swarm, index

    @property
    def state(self) -> RunState:
        return self.swarm.states[self.index]

    def change(self, method: str, *args: Any) -> None:
        self.swarm.do(self.index, getattr(self.state, method)(*args))


def verdict(round_: int, peer: str, action: str, reason: str, struck: bool) -> dict:
    return {
        "type": "verdict", "round": round_, "peer": peer, "action": action, "reason": reason,
        "weight": 0.0 if action == "refuse" else 0.4, "scores": {}, "excluded": False, "struck": struck,
        "strikes": int(struck), "why": "",
    }  # fmt: skip


def test_strikes_by_two_members_exclude_the_struck_peer_on_every_member_and_clips_publish_nothing():
    swarm = Swarm(6, seed=61)
    ids = [str(peer_id_of(s.me)) for s in swarm.states]
    attacker = ids[5]
    seen: list[tuple[str, dict]] = []
    reports = []
    for i in range(5):
        events = Events(ids[i], json_lines=False)
        events.listeners.append(lambda kind, fields, i=i: seen.append((ids[i], {"kind": kind, **fields})))
        reports.append(GuardReports(ids[i], events, lambda i=i: SimLink(swarm, i)))  # type: ignore[arg-type]
    reports[1].on_verdict(verdict(2, attacker, "refuse", "direction", struck=True))
    reports[2].on_verdict(verdict(3, attacker, "clip", "outlier-cos", struck=False))
    reports[3].on_verdict(verdict(4, attacker, "refuse", "outlier-probe", struck=False))
    assert swarm.settle()
    assert list(swarm.states[0].strikes()) == [swarm.states[5].me]  # the strike only, and only one
    assert all(r.excluded() == set() for r in reports)
    reports[2].on_verdict(verdict(9, attacker, "refuse", "no-update", struck=True))
    reports[2].on_verdict(verdict(15, attacker, "refuse", "no-update", struck=True))
    assert swarm.settle()
    for r in reports:
        assert r.excluded() == {attacker}
        r.note_exclusions(16)
    excluded = [fields for who, fields in seen if fields["kind"] == "excluded"]
    assert len(excluded) == 5 and {f["peer"] for f in excluded} == {attacker}
    assert all("3 strikes by 2 members' guards" in f["reason"] for f in excluded)
