"""This round's partner: the run's seeded pairing (gossip/outer/pairing.py) over the live members.

Every peer computes the same matching with no traffic at all, from the sorted member list, the round
number and a seed derived from the run id, so two runs with the same members pair differently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from shoal.gossip.outer.pairing import pairing


def run_seed(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"shoal-pairing/{run_id}".encode()).digest()[:8], "big")


def partner_of(peer_id: str, members: Iterable[str], run_id: str, round_number: int) -> str | None:
    """Our partner in round `round_number` among `members` (we are added if missing), or None: sit out."""
    view = sorted({*members, peer_id})
    return pairing(view, round_number, run_seed(run_id))[peer_id]
