"""SparseLoCo as published: every peer's sparse message gathered by every other peer (all-gather).

A research baseline (docs/outer-methods.md, SparseLoCo): the daemon exchanges with one partner a round, so it
refuses this topology. The codec math (error feedback, contributor-mean, the step without momentum) is the
product's `shoal.gossip.outer.sparseloco`, which `pair-sparseloco` composes with a partner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shoal.gossip.outer.methods import OuterConfig, OuterState
from shoal.gossip.outer.sparseloco import apply, compress, contributor_mean, decode_message
from shoal.gossip.outer.tensors import Named, pseudo_gradient
from shoal.gossip.outer.wire import Message, pack, unpack


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """The codec payload of e ← β·e + Δ (state.error keeps what was not sent)."""
    delta = pseudo_gradient(state.slow, fast)
    msg = Message(config.method, state.origin, state.round)
    msg.update, state.error = compress(delta, state.error, config.codec, config.ef_beta)
    return pack(msg)


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """φ ← φ − α·contributor-mean(own and every other peer's message); sets state.slow."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    decoded = [decode_message(m, state.slow) for m in [mine, *theirs]]
    state.slow = apply(state.slow, contributor_mean(decoded), config.lr)
    return state.slow
