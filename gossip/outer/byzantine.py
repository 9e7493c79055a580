"""Byzantine partners: what a hostile peer sends instead of its honest fast weights (issue 18).

Used by the simulation (`python -m bench.byzantine`) and meant for the live `peer swarm --behave` later:
each attack transforms what the peer would honestly send, given only what such a peer holds: its slow
weights φ_b, its honest fast weights θ_b after H inner steps, its own past messages and θs, and what its
last partner sent it. Pure tensor math, no I/O; seeded, so a run is reproducible.

    scale       θ' = φ + 100·(θ − φ): the pseudo-gradient scaled x100 (the lattice step grows with it)
    sign_flip   θ' = φ − (θ − φ): the pseudo-gradient's sign flipped
    noise       θ' = φ + n, n Gaussian with ‖n‖ = ‖θ − φ‖ per tensor
    replay      the exact bytes it sent `REPLAY_AGE` rounds ago (header and all)
    stale       its honest θ of `REPLAY_AGE` rounds ago, encoded again as this round's message
    copy        the θ its last partner sent it, encoded again as its own (another peer's work)
    lie         a little is enough: θ' = θ + z·rms(θ − φ)·d, with d a fixed seeded ±1 direction per
                coordinate: a shift within the honest spread, aimed at one direction in every round
    free_rider  θ' = φ: its slow weights back, no training
    other_data  trains honestly on another corpus (the same bytes through a fixed random byte permutation:
                as much structure as the real data, all of it wrong), `cipher_batch`

`forge` returns either weights for the method's `make_message` or raw message bytes (`replay`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

ATTACKS = (
    "scale",
    "sign_flip",
    "noise",
    "replay",
    "stale",
    "copy",
    "lie",
    "free_rider",
    "other_data",
)
SCALE = 100.0
REPLAY_AGE = 8  # rounds: old enough that φ has moved on, recent enough to be within a guard's memory
LIE_Z = 1.0  # the shift per coordinate, in units of the attacker's own update's RMS (within the spread)

Named = dict[str, torch.Tensor]


@dataclass
class Forged:
    """What the attacker sends this round: weights to encode as its message, or ready bytes."""

    fast: Named | None = None
    raw: bytes | None = None


@dataclass
class Memory:
    """What one attacker keeps between rounds (bounded)."""

    seed: int = 0
    messages: dict[int, bytes] = field(default_factory=dict)  # round -> the honest message it made
    fasts: deque[tuple[int, Named]] = field(default_factory=lambda: deque(maxlen=REPLAY_AGE + 1))
    received: Named | None = None  # its last partner's decoded θ
    direction: Named | None = None  # lie: the fixed ±1 direction

    def remember(self, round_: int, message: bytes, fast: Mapping[str, torch.Tensor]) -> None:
        self.messages[round_] = message
        self.messages.pop(round_ - REPLAY_AGE - 1, None)
        self.fasts.append((round_, {k: v.detach().clone() for k, v in fast.items()}))


def forge(
    name: str,
    round_: int,
    slow: Mapping[str, torch.Tensor],
    fast: Mapping[str, torch.Tensor],
    memory: Memory,
) -> Forged:
    """The attack `name`'s message for this round. Rounds the attack cannot act in yet (nothing old enough
    to replay, no partner yet to copy) send the honest θ."""
    honest = Forged(fast={k: v.detach().float().clone() for k, v in fast.items()})
    phi = {k: v.detach().float() for k, v in slow.items()}
    theta = {k: v.detach().float() for k, v in fast.items()}
    if name == "scale":
        return Forged(fast={k: phi[k] + SCALE * (theta[k] - phi[k]) for k in phi})
    if name == "sign_flip":
        return Forged(fast={k: 2 * phi[k] - theta[k] for k in phi})
    if name == "noise":
        g = torch.Generator().manual_seed(memory.seed * 7919 + round_)
        out = {}
        for k in sorted(phi):
            n = torch.randn(phi[k].shape, generator=g)
            out[k] = phi[k] + n * (theta[k] - phi[k]).norm() / n.norm().clamp_min(1e-12)
        return Forged(fast=out)
    if name == "replay":
        old = memory.messages.get(round_ - REPLAY_AGE)
        return honest if old is None else Forged(raw=old)
    if name == "stale":
        old_fast = next((f for r, f in memory.fasts if r == round_ - REPLAY_AGE), None)
        return honest if old_fast is None else Forged(fast={k: v.clone() for k, v in old_fast.items()})
    if name == "copy":
        got = memory.received
        return honest if got is None else Forged(fast={k: v.clone() for k, v in got.items()})
    if name == "lie":
        if memory.direction is None:
            g = torch.Generator().manual_seed(memory.seed * 104729 + 1)
            memory.direction = {
                k: torch.randint(0, 2, phi[k].shape, generator=g).float() * 2 - 1 for k in sorted(phi)
            }
        out = {}
        for k in phi:
            rms = (theta[k] - phi[k]).pow(2).mean().sqrt()
            out[k] = theta[k] + LIE_Z * rms * memory.direction[k]
        return Forged(fast=out)
    if name == "free_rider":
        return Forged(fast={k: v.clone() for k, v in phi.items()})
    if name == "other_data":
        return honest  # the harm is in its training data (cipher_batch), not in the message
    raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")


def byte_cipher(seed: int, vocab: int = 256) -> torch.Tensor:
    """A fixed random permutation of the byte vocabulary: `other_data`'s corpus is the text through it."""
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed * 31 + 17))


def cipher_batch(x: torch.Tensor, y: torch.Tensor, cipher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a batch in the other corpus (same positions, permuted bytes)."""
    return cipher[x], cipher[y]
