"""Exclusion from pairing by members' published evidence, as pure rules: poisoned updates (issue 18) and
silence (issue 16).

Each member's own signed document may hold `evidence[accused] = {round, why}`: its partner guard refused
the accused again and again. `exclusions` turns the evidence every replica holds into the same verdict on
every replica: an accused peer is excluded once at least `quorum` distinct members accuse it, `quorum =
max(EVIDENCE_QUORUM_MIN, ⌈EVIDENCE_QUORUM_SHARE × active members⌉)` (no single accuser excludes anyone;
active: a published round within EVIDENCE_ACTIVE_ROUNDS of the newest, so members long gone do not make the
share unreachable). A false accusation costs the accuser: one with more than MAX_LONE_ACCUSATIONS
accusations that no quorum backs loses its voice (none of its accusations count) and is excluded itself.
Evidence counts for EVIDENCE_TTL_ROUNDS rounds after the round it names, by the run's round.

Silence evidence (`silent[accused] = {round}`): a member paired with the accused waited for it in vain (no
answer, or no connection) while the accused kept signing fresh heartbeats in the same life, i.e. it stays
in the run but never swaps. The same quorum excludes it, for SILENCE_TTL_ROUNDS only and with no penalty
for lone accusers: a broken link between two honest peers makes lone accusations, and a peer that is
silent to a quorum of its partners cannot train with the run anyway.

The run's round, which sets both clocks and who counts as active, is the (EVIDENCE_QUORUM_MIN + 1)-th
highest round members published: moving it takes more colluding members than excluding anyone does, so
one made-up round of 2^62 cannot age out every piece of evidence at once.
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
    SILENCE_TTL_ROUNDS,
)

Evidence = Mapping[bytes, Mapping[bytes, Mapping[str, Any]]]  # accused -> accuser -> {"round", "why"}


def run_round(member_rounds: Sequence[int]) -> int:
    """The run's round by its members' word, robust to a few made-up rounds (see the module docstring)."""
    ranked = sorted(member_rounds, reverse=True)
    return ranked[min(len(ranked), EVIDENCE_QUORUM_MIN + 1) - 1] if ranked else 0


def quorum(member_rounds: Sequence[int]) -> int:
    """Accusers needed to exclude a peer, given the rounds the members published."""
    newest = run_round(member_rounds)
    active = sum(1 for r in member_rounds if r >= newest - EVIDENCE_ACTIVE_ROUNDS)
    return max(EVIDENCE_QUORUM_MIN, math.ceil(active * EVIDENCE_QUORUM_SHARE))


def exclusions(evidence: Evidence, member_rounds: Sequence[int]) -> dict[bytes, str]:
    """The peers excluded from pairing, with the reason (see the module docstring)."""
    needed = quorum(member_rounds)
    horizon = run_round(member_rounds) - EVIDENCE_TTL_ROUNDS
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


def silence_exclusions(silent: Evidence, member_rounds: Sequence[int]) -> dict[bytes, str]:
    """The peers excluded from pairing for silence, with the reason (see the module docstring)."""
    needed = quorum(member_rounds)
    horizon = run_round(member_rounds) - SILENCE_TTL_ROUNDS
    out = {}
    for accused, by in silent.items():
        recent = [int(item.get("round", 0)) for item in by.values() if int(item.get("round", 0)) >= horizon]
        if len(recent) >= needed:
            out[accused] = (
                f"silent to {len(recent)} partners that waited for it (quorum {needed}); last in round "
                f"{max(recent)}, paired again after round {max(recent) + SILENCE_TTL_ROUNDS}"
            )
    return out
