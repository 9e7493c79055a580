"""Outer-step math: what each peer sends after its H inner steps, and how it combines what comes back.

Pure tensor functions on one peer's dict of named tensors (never stacked replicas). One module per method
(`diloco`, `sparseloco`, `noloco`), the compositions and the per-round entry point in `methods`, the seeded
pairing in `pairing`, the message envelope in `wire`, dense low-bit codes in `quant`.

The worker calls, once per round (see `methods` for the topology each method needs):

    state = OuterState.fresh(peer_id, model.state_dict())          # once; checkpoint state.state_dict()
    config = OuterConfig.tuned(DEFAULT_METHOD, n_peers=len(members))
    payload = make_message(config, state, fast_weights)             # bytes for the partner
    slow = outer_step(config, state, payload, received_payloads)    # new φ; load it as the next θ
"""

from gossip.outer.methods import (
    DEFAULT_METHOD,
    METHODS,
    TOPOLOGY,
    OuterConfig,
    OuterState,
    known_ids,
    make_message,
    outer_step,
    relay_for,
    wire_bytes,
)
from gossip.outer.pairing import pairing
from gossip.outer.tensors import OuterError
from gossip.outer.wire import MessageError

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "TOPOLOGY",
    "MessageError",
    "OuterConfig",
    "OuterError",
    "OuterState",
    "known_ids",
    "make_message",
    "outer_step",
    "pairing",
    "relay_for",
    "wire_bytes",
]
