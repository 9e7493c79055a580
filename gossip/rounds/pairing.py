"""The seeded pairing: every peer computes the same partners for a round with no traffic at all.

As in NoLoCo's reference code, a permutation of the sorted member list is drawn from a generator
seeded by the round, and position i is paired with position i + n/2: a perfect matching each round,
different from round to round. Shoal seeds with the run id too, so two runs never share a schedule.
With an odd number of members, the last one of the permutation sits the round out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def round_seed(run_id: str, round_number: int) -> int:
    digest = hashlib.sha256(f"shoal-pairing/{run_id}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pairing(members: Iterable[str], run_id: str, round_number: int) -> dict[str, str | None]:
    """Maps every member to its partner for this round, or to None when it sits out."""
    ordered = sorted(set(members))
    order = np.random.default_rng(round_seed(run_id, round_number)).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    half = len(shuffled) // 2
    partners: dict[str, str | None] = {}
    for i in range(half):
        a, b = shuffled[i], shuffled[i + half]
        partners[a], partners[b] = b, a
    if len(shuffled) % 2:
        partners[shuffled[-1]] = None
    return partners


def partner_of(peer_id: str, members: Iterable[str], run_id: str, round_number: int) -> str | None:
    members = set(members)
    members.add(peer_id)
    return pairing(members, run_id, round_number)[peer_id]
