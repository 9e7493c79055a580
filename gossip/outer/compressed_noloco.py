"""V-C compressed NoLoCo: NoLoCo with θ sent as a modulo-lattice code read against the receiver's φ.

See docs/outer-methods.md, V-C compressed NoLoCo. The step is `noloco.noloco_step_from_fast`; only the message
differs. Each tensor's θ is sent as `quant.lattice_encode` codes of `lattice_bits` bits with one step per
tensor, sized so that the lattice covers ± lattice_range · max|Δ| around the receiver's φ. The code only
decodes against a nearby φ, so a peer that joins must first copy φ (and δ) from a partner (pitfall P13); a
partner's step far above this peer's own is refused (MAX_STEP_RATIO, pitfall P17).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from shoal.gossip.outer import quant
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.noloco import noloco_step_from_fast
from shoal.gossip.outer.tensors import Named, pseudo_gradient
from shoal.gossip.outer.wire import Message, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState

# Partners on the same data distribution and schedule move by similar amounts per round: a lattice step
# more than this many times this peer's own is refused (pitfall P17: norm checks on what arrives).
MAX_STEP_RATIO = 16.0
MIN_STEP_ALLOWANCE = 1e-6  # tensors this peer did not move (zero Δ) still accept a small partner step


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """θ as bit-packed lattice codes, one step per tensor (sorted-name order)."""
    delta = pseudo_gradient(state.slow, fast)
    steps, codes = [], []
    for name in sorted(state.slow):
        reach = config.lattice_range * float(delta[name].abs().max()) + 1e-12
        step = 2 * reach / 2**config.lattice_bits
        steps.append(step)
        code = quant.lattice_encode(fast[name].float(), step, config.lattice_bits)
        codes.append(quant.pack_codes(code, config.lattice_bits))  # b bits per value on the wire
    return pack(Message(config.method, state.origin, state.round, tensors=codes, steps=steps))


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)  # the codes are bit-packed already


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """NoLoCo's step on θ decoded with this peer's φ as side information; sets state.slow, state.momentum."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"compressed-noloco pairs with one partner, got {len(theirs)} messages")
    slow = state.slow
    fast = read_lattice(mine, slow, config)
    if theirs:
        check_steps(theirs[0], mine.steps)
    partner = read_lattice(theirs[0], slow, config) if theirs else None
    state.slow, state.momentum = noloco_step_from_fast(
        slow, fast, state.momentum, partner, config.momentum, config.lr
    )
    return state.slow


def check_steps(message: Message, own_steps: Sequence[float]) -> None:
    """Refuse lattice steps far above this peer's own (pitfall P17).

    A step is the sender's claim of how far it moved; a decoded value lands within 2^(b-1) steps of the
    receiver's φ, so the step bounds how far one message can pull.
    """
    for name_index, (theirs, ours) in enumerate(zip(message.steps, own_steps, strict=False)):
        if theirs > MAX_STEP_RATIO * ours + MIN_STEP_ALLOWANCE:
            raise OuterMessageError(
                f"{message.kind} message from {message.origin}: lattice step {theirs:.3g} of tensor "
                f"#{name_index} is over {MAX_STEP_RATIO}x this peer's {ours:.3g}; dropped as implausible"
            )


def read_lattice(message: Message, slow: Mapping[str, torch.Tensor], config: OuterConfig) -> Named:
    """θ of the sender, decoded with this peer's φ as side information."""
    names = sorted(slow)
    if len(message.tensors) != len(names) or len(message.steps) != len(names):
        raise OuterMessageError(
            f"compressed-noloco message from {message.origin} does not match the model's tensors"
        )
    out: Named = {}
    for name, raw, step in zip(names, message.tensors, message.steps, strict=True):
        count = slow[name].numel()
        if len(raw) != quant.packed_bits(count, config.lattice_bits) or not step > 0 or not np.isfinite(step):
            raise OuterMessageError(f"compressed-noloco message from {message.origin}: bad code for {name!r}")
        codes = quant.unpack_codes(raw, count, config.lattice_bits)
        out[name] = quant.lattice_decode(codes, step, slow[name].float(), config.lattice_bits)
    return out
