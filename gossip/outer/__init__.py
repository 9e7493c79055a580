"""Outer-step math: what each peer sends after its H inner steps, and how it combines what comes back.

Pure tensor functions on one peer's dict of named tensors (never stacked replicas), described in
docs/outer-methods.md. One module per method the daemon runs, each with the same make_message / outer_step /
wire_bytes interface: `noloco`, `pair_sparseloco` (V-B), `compressed_noloco` (V-C, the default). `config`
holds OuterConfig, OuterState and the table of methods; `methods` registers the product's methods in it and
is the per-round entry point that dispatches by name (import from `methods`). `sparseloco` is the SparseLoCo
codec math that `pair_sparseloco` composes; `tensors` helpers over named tensors;
the seeded pairing in `pairing`, the message envelope in `wire`, dense low-bit codes in `quant`. The research
variants (diloco, sparseloco, gossip-sparseloco) are not here: bench/convergence/research/ registers them
for the convergence benchmark.

Nothing is imported here, so that the torch-free modules (`wire`, `errors`, `pairing`) load without
torch. The worker calls, once per round (see `methods` for the topology each method needs):

    from shoal.gossip.outer.methods import DEFAULT_METHOD, OuterConfig, OuterState, make_message, outer_step

    state = OuterState.fresh(peer_id, model.state_dict())          # once; checkpoint state.state_dict()
    config = OuterConfig.tuned(DEFAULT_METHOD)
    payload = make_message(config, state, fast_weights)             # bytes for the partner
    slow = outer_step(config, state, payload, received_payloads)    # new φ; load it as the next θ
"""
