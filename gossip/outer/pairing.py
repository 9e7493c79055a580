"""Seeded pairing: every peer computes the same perfect matching with no traffic.

See docs/outer-methods.md, NoLoCo, and pitfall P13.

NoLoCo's reference code draws `np.random.default_rng(step + 1).permutation(N)` on every rank and pairs
perm[i] with perm[i + N/2]. Shoal does the same over an *agreed* view: the run's sorted peer list and the
round number, mixed with the run's pairing seed so that two runs with the same members pair differently.
With an odd count the last element of the permutation sits the round out (a different peer each round).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shoal.errors import ShoalError

# A run of more peers than this would make the pairing permutation (and the membership view it is drawn
# from) a bigger object than one round should carry; the DHT rendezvous caps runs far below it anyway.
MAX_PEERS = 1 << 20


class PairingError(ShoalError):
    """The membership view given to the pairing cannot produce an agreed matching."""


def pairing(peers: Sequence[str], round_: int, seed: int = 0) -> dict[str, str | None]:
    """Return {peer: partner or None} for this round; identical on every peer that holds the same view.

    `peers` may come in any order: it is sorted first, so only the set matters. A peer mapped to None
    sits this round out (odd counts). The matching is symmetric: pairing[a] == b iff pairing[b] == a.
    """
    view = sorted(set(peers))
    if len(view) != len(peers):
        raise PairingError(
            f"pairing got {len(peers) - len(view)} duplicate peer ids in a view of {len(peers)}; "
            "pass each member once (deduplicate the membership view first)"
        )
    if len(view) > MAX_PEERS:
        raise PairingError(f"pairing got {len(view)} peers, more than MAX_PEERS={MAX_PEERS}; shard the run")
    if round_ < 0 or seed < 0:
        raise PairingError(f"pairing needs round >= 0 and seed >= 0, got round={round_} seed={seed}")
    n = len(view)
    # SeedSequence mixes (seed, round) into independent streams; `round + 1` keeps NoLoCo's convention.
    rng = np.random.default_rng([seed, round_ + 1])
    perm = rng.permutation(n)
    half = n // 2
    result: dict[str, str | None] = {}
    for i in range(half):
        a, b = view[perm[i]], view[perm[i + half]]
        result[a] = b
        result[b] = a
    if n % 2:
        result[view[perm[-1]]] = None
    return result


def partner_index(n: int, rank: int, round_: int, seed: int = 0) -> int | None:
    """The partner of replica `rank` among `n` replicas named 0..n-1 (the simulator's view of `pairing`)."""
    names = [f"{i:08d}" for i in range(n)]
    partner = pairing(names, round_, seed)[names[rank]]
    return None if partner is None else int(partner)
