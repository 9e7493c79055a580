"""V-A gossip SparseLoCo: SparseLoCo messages disseminated by pairwise gossip, each applied once at lr/R.

A research variant (docs/outer-methods.md, V-A gossip): each round a peer tells its partner which messages it
holds (`known_ids`) and sends it those the partner lacks (`relay_for`), so every message reaches every peer
in about log2(R) rounds. The daemon does not relay, so it refuses this method. The relay store is
`OuterState.store`: message id (origin, round) -> packed message, checkpointed with the rest (pitfall P20).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shoal.gossip.outer.errors import OuterError
from shoal.gossip.outer.methods import OuterConfig, OuterState
from shoal.gossip.outer.sparseloco import compress, decode_message
from shoal.gossip.outer.tensors import Named, pseudo_gradient
from shoal.gossip.outer.wire import Message, pack, unpack

# A message is kept OuterConfig.gossip_ttl rounds for relaying (default 6): ≥ log2(R) rounds reach every
# peer of a random matching schedule with high probability at R ≤ 64; older ones are dropped, and refused
# on arrival.
# Bound on the gossip store (messages kept for relaying): TTL rounds of up to this many origins each.
MAX_GOSSIP_ORIGINS = 1024


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """The codec payload of e ← β·e + Δ (state.error changes); kept in the store to relay."""
    delta = pseudo_gradient(state.slow, fast)
    msg = Message(config.method, state.origin, state.round)
    msg.update, state.error = compress(delta, state.error, config.codec, config.ef_beta)
    packed = pack(msg)
    state.store[msg.id] = packed
    return packed


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)


def known_ids(state: OuterState) -> set[tuple[str, int]]:
    """Ids of the messages this peer holds (what it tells its partner before the relay)."""
    return set(state.store)


def relay_for(config: OuterConfig, state: OuterState, partner_known: set[tuple[str, int]]) -> list[bytes]:
    """The stored messages the partner lacks (younger than the TTL), to send it this round."""
    return [
        m
        for mid, m in sorted(state.store.items())
        if mid not in partner_known and mid[1] > state.round - config.gossip_ttl
    ]


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """Apply own + every message not applied before, each once, at lr / n_peers; keep them to relay."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    slow = state.slow
    fresh: list[tuple[Message, bytes]] = []
    oldest = state.round - config.gossip_ttl
    for msg, packed in zip(theirs, received, strict=True):
        if msg.id in state.store or msg.round <= oldest or msg.round > state.round:
            continue  # seen, too old to dedup safely, or from the future: drop
        fresh.append((msg, packed))
    decoded = [decode_message(m, slow)[0] for m in [mine] + [m for m, _ in fresh]]
    scale = config.lr / config.n_peers
    new = {n: phi.float().clone() for n, phi in slow.items()}
    for values in decoded:
        for n in new:
            new[n] -= scale * values[n]
    for msg, packed in fresh:
        state.store[msg.id] = packed
    # Forget what is past the TTL (bounded store); refuse to grow past the origin cap.
    state.store = {mid: m for mid, m in state.store.items() if mid[1] > oldest + 1}
    if len(state.store) > config.gossip_ttl * MAX_GOSSIP_ORIGINS:
        raise OuterError(f"gossip store holds {len(state.store)} messages, over the cap; too many origins")
    state.slow = new
    return new
