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

Strike evidence (`struck[accused] = {round, strikes, why}`): the accuser's guard refused the accused by a
rule whose word holds alone (a flipped update, no update at all, a repeat; `strikes` times within
EVIDENCE_TTL_ROUNDS, `round` the last). A guard meets a given partner about once in R−1 rounds, so it alone
rarely strikes one STRIKES_TO_EXCLUDE times within its own window, while the run meets that partner every
round. The accused is excluded once the live strikes of at least `quorum` distinct members add up to
STRIKES_TO_EXCLUDE, each member's count capped at MAX_STRIKES_COUNTED (so that no one member makes the
count alone); a member's strikes count for EVIDENCE_TTL_ROUNDS after its last one. No penalty for lone
strikers: a guard strikes an attacker each time it meets it, before any other member has, and a crowd of
sybils each struck once would otherwise silence the honest members that struck them. Members excluded
for poisoned updates have no voice here either.

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
    MAX_STRIKES_COUNTED,
    SILENCE_TTL_ROUNDS,
    STRIKES_TO_EXCLUDE,
)

Evidence = Mapping[bytes, Mapping[bytes, Mapping[str, Any]]]  # accused -> accuser -> {"round", "why", ...}


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


def run_exclusions(
    evidence: Evidence, struck: Evidence, silent: Evidence, member_rounds: Sequence[int]
) -> dict[bytes, str]:
    """Every exclusion from pairing the members' published evidence makes, with the reason: poisoned
    updates, strikes and silence. A member excluded for poisoned updates has no voice about the others."""
    poisoned = exclusions(evidence, member_rounds)
    struck, silent = (
        {accused: {a: item for a, item in by.items() if a not in poisoned} for accused, by in kind.items()}
        for kind in (struck, silent)
    )
    return {
        **silence_exclusions(silent, member_rounds),
        **strike_exclusions(struck, member_rounds),
        **poisoned,
    }


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


def strike_exclusions(struck: Evidence, member_rounds: Sequence[int]) -> dict[bytes, str]:
    """The peers excluded from pairing for their guards' strikes, with the reason (see the module
    docstring). `struck`: accused -> striker -> {"round", "strikes", "why"}."""
    needed = quorum(member_rounds)
    horizon = run_round(member_rounds) - EVIDENCE_TTL_ROUNDS
    out = {}
    for accused, by in struck.items():
        live = {
            a: min(MAX_STRIKES_COUNTED, max(1, int(item.get("strikes", 1))))
            for a, item in by.items()
            if int(item.get("round", 0)) >= horizon
        }
        if len(live) >= needed and sum(live.values()) >= STRIKES_TO_EXCLUDE:
            whys = sorted({str(by[a].get("why", "")) for a in live} - {""})
            out[accused] = (
                f"{sum(live.values())} strikes by {len(live)} members' guards (quorum {needed}): "
                + "; ".join(whys)[:MAX_REASON_CHARS]
            )
    return out


def note_strike(kept: Mapping[str, Any] | None, round_: int, why: str) -> dict[str, Any]:
    """This member's strike record of one partner after one more strike in `round_`: its count within
    EVIDENCE_TTL_ROUNDS (a strike older than that starts the count again)."""
    count = 0
    if isinstance(kept, Mapping) and int(kept.get("round", 0)) >= round_ - EVIDENCE_TTL_ROUNDS:
        count = max(0, int(kept.get("strikes", 0)))
    return {"round": int(round_), "strikes": min(count + 1, 1 << 20), "why": why[:MAX_REASON_CHARS]}
