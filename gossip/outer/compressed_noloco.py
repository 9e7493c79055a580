"""V-C compressed NoLoCo: NoLoCo with θ sent as a modulo-lattice code read against the receiver's φ.

See docs/outer-methods.md, V-C compressed NoLoCo. The step is `noloco.noloco_step_from_fast`; only the
message differs. Each tensor's θ is sent as `quant` lattice codes of `lattice_bits` bits with one step per
tensor, sized so that the lattice covers ± lattice_range · max|Δ| around the receiver's φ, and, with
lattice_drift > 0, also lattice_drift × the replica distance this peer measured in its recent decodes
(`OuterState.drift`). The rounding is dithered (subtractive, seeded by the sender's id, the round and the
tensor's index, so both sides draw the same dither), and each block of CHECK_BLOCK values carries a 16-bit
check of its lattice indices: a block whose decoded indices fail it wrapped (the partner's θ was out of
reach), and the receiver applies no pull there (it uses its own θ in those values) and counts it
(`OuterState.counters`). The code only decodes against a nearby φ, so a peer that joins must first copy φ
(and δ) from a partner (pitfall P13); a partner's step far above this peer's own is refused
(MAX_STEP_RATIO, pitfall P17).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from shoal.gossip.outer import quant
from shoal.gossip.outer.errors import OuterError, OuterMessageError
from shoal.gossip.outer.noloco import noloco_step_from_fast
from shoal.gossip.outer.tensors import Named, pseudo_gradient
from shoal.gossip.outer.wire import Message, check_bytes, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState

# Partners on the same data distribution and schedule move by similar amounts per round: a lattice step
# more than this many times this peer's own is refused (pitfall P17: norm checks on what arrives).
MAX_STEP_RATIO = 16.0
MIN_STEP_ALLOWANCE = 1e-6  # tensors this peer did not move (zero Δ) still accept a small partner step
# OuterState.drift forgets this fraction a round, so the step narrows again as the replicas come together.
DRIFT_DECAY = 0.9
# float64 holds integers exactly up to 2^53: a step this small against the weights cannot be decoded.
MAX_INDEX = 2.0**50


def dither_seed(origin: str, round_: int, index: int) -> int:
    """The seed of tensor #index's dither in `origin`'s message of round `round_` (the same on both sides)."""
    text = f"{origin}\0{round_}\0{index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def lattice_step(config: OuterConfig, state: OuterState, name: str, delta_max: float) -> float:
    """The step of tensor `name`: the lattice's window 2^(b-1)·step covers the distance to the partner's φ."""
    reach = config.lattice_range * delta_max
    if config.lattice_drift > 0:
        reach = max(reach, config.lattice_drift * state.drift.get(name, 0.0))
    return 2 * (reach + 1e-12) / 2**config.lattice_bits


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """θ as bit-packed dithered lattice codes, one step and one check list per tensor (sorted-name order)."""
    delta = pseudo_gradient(state.slow, fast)
    bits = config.lattice_bits
    steps, codes, checks = [], [], []
    for index, name in enumerate(sorted(state.slow)):
        step = lattice_step(config, state, name, float(delta[name].abs().max()))
        x = fast[name].float()
        dither = quant.lattice_dither(x.numel(), step, dither_seed(state.origin, state.round, index))
        k = quant.lattice_indices(x, step, dither)
        steps.append(step)
        codes.append(quant.pack_codes(torch.remainder(k, 2**bits).to(torch.uint8), bits))  # b bits a value
        checks.append(quant.block_checks(k))
    return pack(Message(config.method, state.origin, state.round, tensors=codes, steps=steps, checks=checks))


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)  # the codes are bit-packed already


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """NoLoCo's step on θ decoded with this peer's φ as side information; sets state.slow, state.momentum.

    In the partner's blocks whose check fails (wrapped), this peer's own θ stands in: no pull there.
    """
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"compressed-noloco pairs with one partner, got {len(theirs)} messages")
    slow = state.slow
    own_decoded = read_lattice(mine, slow, config)
    if any(bool(w.any()) for w in own_decoded.wrapped.values()):
        raise OuterError("this peer's own lattice message does not decode: lattice_range is too small")
    fast = own_decoded.values
    partner: Named | None = None
    if theirs:
        check_steps(theirs[0], mine.steps)
        decoded = read_lattice(theirs[0], slow, config)  # raises before anything changes
        partner = {n: torch.where(decoded.wrapped[n], fast[n], decoded.values[n]) for n in fast}
        _track(config, state, decoded, theirs[0].steps)
    state.slow, state.momentum = noloco_step_from_fast(
        slow, fast, state.momentum, partner, config.momentum, config.lr
    )
    return state.slow


def _track(config: OuterConfig, state: OuterState, decoded: Decoded, steps: Sequence[float]) -> None:
    """Count wrapped values and update the running replica distance per tensor (OuterState.drift)."""
    window_steps = 2 ** (config.lattice_bits - 1)
    counters = state.counters
    for name, step in zip(sorted(state.slow), steps, strict=True):
        wrapped = decoded.wrapped[name]
        n_wrapped = int(wrapped.sum())
        counters["lattice_values"] = counters.get("lattice_values", 0) + wrapped.numel()
        counters["lattice_wrapped"] = counters.get("lattice_wrapped", 0) + n_wrapped
        gap = (decoded.values[name] - state.slow[name].float()).abs().masked_fill(wrapped, 0.0)
        seen = float(gap.max()) if gap.numel() else 0.0
        if n_wrapped:  # the distance was out of reach somewhere: at least the partner's whole window
            seen = max(seen, window_steps * step)
        state.drift[name] = max(seen, DRIFT_DECAY * state.drift.get(name, 0.0))


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


@dataclass
class Decoded:
    """A lattice message decoded against this peer's φ: θ's values, and per tensor the values in blocks
    whose check failed (wrapped: not to be applied)."""

    values: Named
    wrapped: dict[str, torch.Tensor]


def read_lattice(message: Message, slow: Mapping[str, torch.Tensor], config: OuterConfig) -> Decoded:
    """θ of the sender, decoded with this peer's φ as side information, and the blocks that wrapped."""
    names = sorted(slow)
    if not len(message.tensors) == len(message.steps) == len(message.checks) == len(names):
        raise OuterMessageError(
            f"compressed-noloco message from {message.origin} does not match the model's tensors"
        )
    bits = config.lattice_bits
    values: Named = {}
    wrapped: dict[str, torch.Tensor] = {}
    for index, (name, raw, step, check) in enumerate(
        zip(names, message.tensors, message.steps, message.checks, strict=True)
    ):
        count = slow[name].numel()
        side = slow[name].float()
        if (
            len(raw) != quant.packed_bits(count, bits)
            or len(check) != check_bytes(count)
            or not (step > 0 and np.isfinite(step))
            or float(side.abs().max()) + 1.0 > MAX_INDEX * step
        ):
            raise OuterMessageError(f"compressed-noloco message from {message.origin}: bad code for {name!r}")
        codes = quant.unpack_codes(raw, count, bits)
        dither = quant.lattice_dither(count, step, dither_seed(message.origin, message.round, index))
        k = quant.lattice_decode_indices(codes, step, side, bits, dither)
        values[name] = quant.lattice_values(k, step, dither).to(torch.float32).view(side.shape)
        wrapped[name] = quant.block_mask(quant.wrapped_blocks(k, check), count).view(side.shape)
    return Decoded(values, wrapped)
