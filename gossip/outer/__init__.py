"""Outer-step math: what each peer sends after its H inner steps, and how it combines what comes back.

Pure tensor functions on one peer's dict of named tensors (never stacked replicas). One module per method
(`diloco`, `sparseloco`, `noloco`), the compositions and the per-round entry point in `methods`, the seeded
pairing in `pairing`, the message envelope in `wire`, dense low-bit codes in `quant`.

Nothing is imported here, so that the torch-free modules (`wire`, `errors`, `pairing`) load without
torch. The worker calls, once per round (see `methods` for the topology each method needs):

    from shoal.gossip.outer.methods import DEFAULT_METHOD, OuterConfig, OuterState, make_message, outer_step

    state = OuterState.fresh(peer_id, model.state_dict())          # once; checkpoint state.state_dict()
    config = OuterConfig.tuned(DEFAULT_METHOD, n_peers=len(members))
    payload = make_message(config, state, fast_weights)             # bytes for the partner
    slow = outer_step(config, state, payload, received_payloads)    # new φ; load it as the next θ
"""
