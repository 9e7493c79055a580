"""The one entry point the worker calls each round: the outer method's config, state and a dispatch table.

A round, for one peer (its slow weights φ, its fast weights θ after H inner steps):

    message = make_message(config, state, fast)          # bytes for the partner; may update `state`'s buffers
    ... the round protocol swaps messages with this round's partner ...
    slow = outer_step(config, state, message, received)  # new φ, also stored in `state`; θ ← φ next

`received` is what arrived this round: for the pairwise methods the partner's one message, or none when
sitting out. Messages are parsed with limits (`wire.unpack`) and checked against this peer's layout; a bad
one raises `OuterMessageError` *before* anything touches φ, so a round applies a whole validated update or
none.

Each method is one module with the same interface, `make_message(config, state, fast) -> bytes`,
`outer_step(config, state, own, received) -> Named` (updates φ and the method's buffers in `state`; the round
counter is advanced here) and `wire_bytes(config, message) -> int`; MODULES maps a method's name to it.
The product's methods (docs/outer-methods.md) all exchange with one partner a round:
* `noloco`             (`noloco`) pairwise modified Nesterov; sends θ in fp32 (β = γ form, one message each
                       way).
* `pair-sparseloco`    (`pair_sparseloco`) V-B: partners apply the same contributor-mean of their two sparse
                       messages, then pull φ toward the pair mean on a rotating 1/F slice.
* `compressed-noloco`  (`compressed_noloco`) V-C: NoLoCo with θ sent as a dithered modulo-lattice code
                       relative to the receiver's φ, its window sized to the replicas' measured distance, with
                       block checks so that wrapped values are not applied. The default (DEFAULT_METHOD): the
                       fewest bytes (3.08 bits/param, O(1) in the number of peers) of the compositions that
                       stay within 1 % of DiLoCo's loss at R = 4, 8 and 16. A peer that joins must first copy
                       φ (and δ) from a partner (pitfall P13).
The research variants (diloco, sparseloco, gossip-sparseloco) need all-reduce, all-gather or relays, which
the daemon does not do; they live in bench/convergence/research/, which `register`s them here for the
convergence benchmark. The installed package never imports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shoal.gossip.outer import compressed_noloco, noloco, pair_sparseloco
from shoal.gossip.outer.config import (
    INTERFACE,
    MODULES,
    TOPOLOGIES,
    TOPOLOGY,
    TUNED,
    OuterConfig,
    OuterState,
    register,
)
from shoal.gossip.outer.tensors import Named, check_same_layout

__all__ = [
    "DEFAULT_METHOD",
    "INTERFACE",
    "METHODS",
    "MODULES",
    "TOPOLOGIES",
    "TOPOLOGY",
    "TUNED",
    "OuterConfig",
    "OuterState",
    "check_layout",
    "make_message",
    "outer_step",
    "register",
    "wire_bytes",
]

# Tuned by `python -m bench.convergence --sweep` at the CI size (d=64, L=2, R=4, H=12, N=480, seed 0); losses
# (nats/byte) of the values tried, best first. One seed moves the loss by ~0.03, so close calls are noise.
# noloco β 0.7: 2.283; 0.9: 2.284; 0.5: 2.317
register("noloco", noloco, "pair", {"lr": noloco.DEFAULT_BETA, "momentum": noloco.DEFAULT_ALPHA})
# pair-sparseloco F=2: 2.369 (4.5 bits/param); F=1: 2.369 (8.7); F=8: 2.425 (1.3);
# 4-bit lattice consensus F=2: 2.507
register("pair-sparseloco", pair_sparseloco, "pair", {"lr": 1.0, "consensus_every": 2})
# compressed-noloco, chosen at R = 4 / 8 / 16 (`python -m bench.convergence --quick --peers 4,8,16`, seed 0,
# docs/benchmarks.md "The default at scale"), loss / DiLoCo by lattice bits/range/drift:
# 3/6/1.5: 0.962 / 0.975 / 0.987 (3.08 bits/param); 4/3/1.5: 0.974 / 0.982 / 0.986 (4.08), the default:
# the 3-bit pick's wide step left a live 3-peer tiny swarm's replicas no closer than replicas trained alone
# (spread 0.0066 vs 0.0059, tests/peer/test_end_to_end.py); 4/3/1.5: 0.0027 vs 0.0060;
# 4/6/0: 0.977 / 0.983 / 0.983 (4.08); 3/6/0: 0.979 / 0.981 / 0.990; 3/6/1.0: 0.993 / 0.975 / 0.983;
# 3/3/1.5: 0.975 / 0.986 / 1.002; 3/3/0: 1.019 / 1.031 / 1.065 (wraps flagged: no pull in 28-47 % of values)
# Outer β / α at --full (R = 8, seed 0; docs/benchmarks.md "--full: tuning"), loss / DiLoCo: 1.0 / 0.5: 1.039
# (at --quick 0.984 / 1.004 / 1.000, spread growing with R: the candidate, not adopted on one seed);
# 0.7 / 0.7: 1.052 (--quick R = 8, 16: 1.010, 1.025); 0.7 / 0.5: 1.056; 0.5 / 0.7: 1.057; 0.4 / 0.8: 1.090
register(
    "compressed-noloco",
    compressed_noloco,
    "pair",
    {
        "lr": noloco.DEFAULT_BETA,
        "momentum": noloco.DEFAULT_ALPHA,
        "lattice_bits": 4,
        "lattice_range": 3.0,
        "lattice_drift": 1.5,
    },
)
# The product's methods: each swaps messages with one partner a round, which is all the daemon does.
METHODS = ("noloco", "pair-sparseloco", "compressed-noloco")
# The composition with the fewest bytes among those within 1 % of DiLoCo's loss at R = 4, 8 and 16 at --quick
# (bench.convergence --scaling: `bench_pick`).
DEFAULT_METHOD = "compressed-noloco"
# The methods whose step pulls toward one partner's θ, affine in it: `outer_step` can weight the pull.
PULLS = ("noloco", "compressed-noloco")


def uses_error_feedback(method: str) -> bool:
    """Does `method` keep an error-feedback buffer (sparse methods: what was not sent, sent later)? A
    module says so with ERROR_FEEDBACK; one that does not say is given a buffer."""
    return bool(getattr(MODULES[method], "ERROR_FEEDBACK", True))


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """This peer's message for the round. Sparse methods fold Δ into the EF buffer (state.error changes)."""
    return MODULES[config.method].make_message(config, state, fast)


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    """Bytes this message would take on a real link (codes held one per byte counted at their bit width)."""
    return MODULES[config.method].wire_bytes(config, message)


def outer_step(
    config: OuterConfig,
    state: OuterState,
    own: bytes,
    received: Sequence[bytes],
    consume: bool = False,
    weight: float = 1.0,
) -> Named:
    """Combine this peer's own message with what arrived; returns (and stores) the new slow weights φ.

    Every received message is parsed and validated before any weight changes; OuterMessageError otherwise.
    The round counter advances, so the next `make_message` belongs to the next round.

    `consume`: the caller keeps no reference to `state.slow` and `state.momentum` (the dicts; a checkpoint's
    `state_dict` has its own): a method that can (CONSUMES) lets each tensor's old φ and momentum go as soon
    as its step is done, emptying those dicts as it goes, instead of holding the whole old state until the
    new one is complete (a model less at the outer step's peak).

    `weight`: how far the partner pulls, for the methods that pull toward one partner (PULLS: the partner
    guard's clip, gossip/outer/guarded_step.py): 1 is the method's step, w < 1 the step alone moved w of the
    way toward it, in the same single pass.
    """
    module = MODULES[config.method]
    options: dict[str, object] = {}
    if weight < 1.0:
        if config.method not in PULLS:
            raise ValueError(f"outer method {config.method!r} takes no partner weight")
        options["weight"] = weight
    if consume and getattr(module, "CONSUMES", False):
        options["consume"] = True
    module.outer_step(config, state, own, received, **options)
    state.round += 1
    return state.slow


def check_layout(state: OuterState, fast: Mapping[str, torch.Tensor]) -> None:
    check_same_layout(state.slow, fast, "fast weights")
