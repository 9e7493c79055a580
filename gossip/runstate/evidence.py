"""Exclusion from pairing by members' published evidence of poisoned updates (issue 18), as a pure rule.

Each member's own signed document may hold `evidence[accused] = {round, why}`: its partner guard refused
the accused again and again. `exclusions` turns the evidence every replica holds into the same verdict on
every replica: an accused peer is excluded once at least `quorum` distinct members accuse it, `quorum =
max(EVIDENCE_QUORUM_MIN, ⌈EVIDENCE_QUORUM_SHARE × active members⌉)` (no single accuser excludes anyone;
active: a published round within EVIDENCE_ACTIVE_ROUNDS of the newest, so members long gone do not make the
share unreachable). A false accusation costs the accuser: one with more than MAX_LONE_ACCUSATIONS
accusations that no quorum backs loses its voice (none of its accusations count) and is excluded itself.
Evidence counts for EVIDENCE_TTL_ROUNDS rounds after the round it names, by the newest published round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .limits import (
    EVIDENCE_ACTIVE_ROUNDS,
    EVIDENCE_QUORUM_MIN,
    EVIDENCE_QUORUM_SHARE,
    EVIDENCE_TTL_ROUNDS,
    MAX_LONE_ACCUSATIONS,
    MAX_REASON_CHARS,
)

Evidence = Mapping[bytes, Mapping[bytes, Mapping[str, Any]]]  # accused -> accuser -> {"round", "why"}


def quorum(member_rounds: Sequence[int]) -> int:
    """Accusers needed to exclude a peer, given the rounds the members published."""
    newest = max(member_rounds, default=0)
    active = sum(1 for r in member_rounds if r >= newest - EVIDENCE_ACTIVE_ROUNDS)
    return max(EVIDENCE_QUORUM_MIN, math.ceil(active * EVIDENCE_QUORUM_SHARE))


def exclusions(evidence: Evidence, member_rounds: Sequence[int]) -> dict[bytes, str]:
    """The peers excluded from pairing, with the reason (see the module docstring)."""
    needed = quorum(member_rounds)
    horizon = max(member_rounds, default=0) - EVIDENCE_TTL_ROUNDS
    evidence = {
        accused: live
        for accused, by in evidence.items()
        if (live := {a: item for a, item in by.items() if int(item.get("round", 0)) >= horizon})
    }
    backed = {accused for accused, by in evidence.items() if len(by) >= needed}
    lone: dict[bytes, int] = {}
    for accused, by in evidence.items():
        if accused not in backed:
            for accuser in by:
                lone[accuser] = lone.get(accuser, 0) + 1
    silenced = {a for a, n in lone.items() if n > MAX_LONE_ACCUSATIONS}
    out = {
        a: f"accused {lone[a]} peers that no other member accused (over {MAX_LONE_ACCUSATIONS})"
        for a in silenced
    }
    for accused, by in evidence.items():
        voices = sorted(set(by) - silenced)
        if len(voices) >= needed:
            whys = sorted({str(by[v].get("why", "")) for v in voices} - {""})
            out.setdefault(
                accused,
                f"evidence of poisoned updates from {len(voices)} members (quorum {needed}): "
                + "; ".join(whys)[:MAX_REASON_CHARS],
            )
    return out
