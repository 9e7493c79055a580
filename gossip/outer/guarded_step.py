"""The outer step with the partner guard: read the partner's θ as the step would apply it, and step with a
verdict's weight (issue 18, "Poisoned updates"; the verdict itself is `guard.Guard`'s).

`partner_fast` decodes a partner's message into the θ_p this peer's step would pull toward (for the lattice
code: against this peer's φ, with this peer's own θ in the blocks that wrapped), which the guard measures and
probes. `weighted_step` then applies the verdict: the method's step with weight 1, the step alone with 0, and
in between (1 − w)·alone + w·with-partner, exact for the NoLoCo methods, whose step is affine in θ_p (the
partner's θ moved w of the way from this peer's own before the step). Only the NoLoCo methods are judged
(JUDGED): pair-sparseloco's partners apply a shared contributor-mean, not a pull.
Pure tensor math, no I/O: the worker and `bench.byzantine` share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shoal.gossip.outer import compressed_noloco, noloco
from shoal.gossip.outer.config import OuterConfig, OuterState
from shoal.gossip.outer.methods import PULLS, outer_step
from shoal.gossip.outer.tensors import Named
from shoal.gossip.outer.wire import Message, unpack

# The methods whose partner messages the guard judges: a pull toward the partner's θ, affine in θ.
JUDGED = PULLS
# A partner that jumped to the run's round after it made its message (it had skipped rounds) stamps it with
# the round it had finished, a round or two back; older than this is not this round's message. (At 16, the
# live replay of a message 8 rounds old passed as this round's and cost the honest peers 1.9 %.)
MAX_ROUND_LAG = 2


def partner_fast(
    config: OuterConfig,
    state: OuterState,
    own: bytes,
    message: bytes,
    own_fast: Mapping[str, torch.Tensor],
) -> tuple[Message, Named, float]:
    """The partner's message, the θ_p this peer's step would pull toward, and the fraction of its values
    that wrapped (replaced by this peer's own θ: no pull there). Raises OuterMessageError for a message the
    method would refuse (format, layout, non-finite values, a lattice step far above this peer's own)."""
    if config.method not in JUDGED:
        raise ValueError(f"the guard judges {', '.join(JUDGED)} messages, not {config.method!r}")
    parsed = unpack(message, config.method)
    if config.method == "noloco":
        views = noloco.dense_views(parsed, state.slow)
        return (
            parsed,
            {k: torch.from_numpy(v.copy()).view(state.slow[k].shape) for k, v in views.items()},
            0.0,
        )
    compressed_noloco.check_steps(parsed, unpack(own, config.method).steps)
    values, wrapped = compressed_noloco.read_partner(parsed, state.slow, own_fast, config)
    return parsed, values, wrapped


def weighted_step(
    config: OuterConfig, state: OuterState, own: bytes, partner: bytes, weight: float, consume: bool = False
) -> None:
    """The outer step with the partner's pull weighted by `weight` (1: the method's step, 0: alone), in one
    pass (methods.outer_step's `weight`: a clipped round holds no more than an accepted one; computing both
    steps and mixing them held 2.7 models more at the peak with gpt2-small).

    A message the method refuses raises OuterMessageError and leaves `state` as it was. `consume`: as
    methods.outer_step's."""
    if weight <= 0.0:
        outer_step(config, state, own, [], consume)
        return
    outer_step(config, state, own, [partner], consume, weight=min(weight, 1.0))
