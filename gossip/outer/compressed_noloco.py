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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from shoal.gossip.outer import quant
from shoal.gossip.outer.errors import OuterError, OuterMessageError
from shoal.gossip.outer.noloco import ChunkStep, flat32
from shoal.gossip.outer.tensors import Named, check_same_layout
from shoal.gossip.outer.wire import CHECK_BLOCK, Message, check_bytes, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState

# Partners on the same data distribution and schedule move by similar amounts per round: a lattice step
# more than this many times this peer's own is refused (pitfall P17: norm checks on what arrives).
ERROR_FEEDBACK = False  # the lattice code sends θ itself each round: no residual carried over
CONSUMES = True  # outer_step can let the old state go tensor by tensor (methods.outer_step's `consume`)
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
    """θ as bit-packed dithered lattice codes, one step and one check list per tensor (sorted-name order).

    A chunk at a time (quant.encode_packed): no Δ tensor, no per-parameter float64 or int64.
    """
    check_same_layout(state.slow, fast, "fast weights")
    bits = config.lattice_bits
    scratch = quant.Scratch()
    steps, codes, checks = [], [], []
    for index, name in enumerate(sorted(state.slow)):
        x = flat32(fast[name])
        step = lattice_step(config, state, name, abs_max(flat32(state.slow[name]), x, scratch))
        dither = quant.Dither(step, dither_seed(state.origin, state.round, index))
        code, check = quant.encode_packed(x, step, bits, dither, scratch)  # b bits a value
        steps.append(step)
        codes.append(code)
        checks.append(check)
    return pack(Message(config.method, state.origin, state.round, tensors=codes, steps=steps, checks=checks))


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)  # the codes are bit-packed already


def abs_max(a: np.ndarray, b: np.ndarray | None, scratch: quant.Scratch) -> float:
    """max |a − b| (or |a|) in float32, NaN if any, as `(a - b).abs().max()`, a chunk at a time."""
    peaks = [np.float32(0.0)] if a.size == 0 else []
    for start, stop in quant.chunk_bounds(a.size):
        d = scratch.values[: stop - start]
        if b is None:
            np.abs(a[start:stop], out=d)
        else:
            np.subtract(a[start:stop], b[start:stop], out=d)
            np.abs(d, out=d)
        peaks.append(d.max())
    return float(np.max(peaks))


def outer_step(
    config: OuterConfig,
    state: OuterState,
    own: bytes,
    received: Sequence[bytes],
    consume: bool = False,
    weight: float = 1.0,
) -> Named:
    """NoLoCo's step on θ decoded with this peer's φ as side information; sets state.slow, state.momentum.

    In the partner's blocks whose check fails (wrapped), this peer's own θ stands in: no pull there.
    The same results, bit for bit, as `read_lattice` of both messages then `noloco.noloco_step_from_fast`,
    but one pass per message, a chunk at a time: this peer's θ is decoded into the new φ's buffer (checked
    whole before the partner's message is read), then each chunk of the partner's θ is decoded, tracked and
    stepped; nothing else the size of the model is allocated. With `consume` (methods.outer_step) each
    tensor's old φ and momentum leave the state's dicts once its step is done; `weight`: the partner's
    pull, as methods.outer_step's.
    """
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"compressed-noloco pairs with one partner, got {len(theirs)} messages")
    slow = state.slow
    names, scratch, sides, peaks = _sides(mine, slow, config)
    new_slow = {name: torch.empty(slow[name].shape, dtype=torch.float32) for name in names}
    for index, name in enumerate(names):
        theta = new_slow[name].view(-1).numpy()
        for _, _, _, wrapped in _decode(mine, index, sides[name], peaks[name], config, scratch, theta):
            if wrapped.any():
                raise OuterError(
                    "this peer's own lattice message does not decode: lattice_range is too small"
                )
    partner = theirs[0] if theirs else None
    if partner is not None:
        check_steps(partner, mine.steps)
        _check_codes(partner, sides, peaks, config)  # raises before anything changes
    dtypes = {name: slow[name].dtype for name in names}
    new_momentum: Named = {}
    for index, name in enumerate(names):
        new_momentum[name] = torch.empty(slow[name].shape, dtype=torch.float32)
        theta = new_slow[name].view(-1).numpy()
        pull = ChunkStep(new_momentum[name], theta, sides[name], flat32(state.momentum[name]), config, weight)
        if partner is None:
            for start, stop in quant.chunk_bounds(theta.size):
                pull.step(start, stop, None)
        else:
            n_wrapped, gaps = 0, [np.float32(0.0)]
            for start, stop, values, wrapped in _decode(
                partner, index, sides[name], peaks[name], config, scratch, None
            ):
                n_wrapped += _gap_and_patch(values, theta[start:stop], sides[name][start:stop], wrapped, gaps)
                pull.step(start, stop, values)
            _track(config, state, name, partner.steps[index], theta.size, n_wrapped, float(np.max(gaps)))
        if consume:  # nothing refers to this tensor's old φ and momentum any more
            del pull, sides[name], slow[name], state.momentum[name]
    state.momentum = new_momentum
    state.slow = {n: t if dtypes[n] == torch.float32 else t.to(dtypes[n]) for n, t in new_slow.items()}
    return state.slow


def _gap_and_patch(
    values: np.ndarray, theta: np.ndarray, phi: np.ndarray, wrapped: np.ndarray, gaps: list
) -> int:
    """For `_track`: append the chunk's largest |θ_partner − φ| outside wrapped blocks to `gaps`; then put
    this peer's θ in the partner's wrapped blocks. Returns how many values those blocks hold."""
    gap = np.subtract(values, phi)
    np.abs(gap, out=gap)
    count = 0
    for block in np.flatnonzero(wrapped).tolist():
        lo, hi = block * CHECK_BLOCK, min(values.size, (block + 1) * CHECK_BLOCK)
        gap[lo:hi] = 0.0
        values[lo:hi] = theta[lo:hi]
        count += hi - lo
    gaps.append(gap.max())
    return count


def _track(
    config: OuterConfig, state: OuterState, name: str, step: float, count: int, n_wrapped: int, seen: float
) -> None:
    """Count wrapped values and update the running replica distance of one tensor (OuterState.drift)."""
    counters = state.counters
    counters["lattice_values"] = counters.get("lattice_values", 0) + count
    counters["lattice_wrapped"] = counters.get("lattice_wrapped", 0) + n_wrapped
    if n_wrapped:  # the distance was out of reach somewhere: at least the partner's whole window
        seen = max(seen, 2 ** (config.lattice_bits - 1) * step)
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
    names, scratch, sides, peaks = _sides(message, slow, config)
    values: Named = {}
    wrapped: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        out = values[name] = torch.empty(slow[name].shape, dtype=torch.float32)
        flat = out.view(-1).numpy()
        blocks = [w for *_, w in _decode(message, index, sides[name], peaks[name], config, scratch, flat)]
        per_block = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.zeros(0, dtype=torch.bool)
        wrapped[name] = quant.block_mask(per_block, flat.size).view(out.shape)
    return Decoded(values, wrapped)


def read_partner(
    message: Message,
    slow: Mapping[str, torch.Tensor],
    own_fast: Mapping[str, torch.Tensor],
    config: OuterConfig,
) -> tuple[Named, float]:
    """θ of the sender decoded with this peer's φ as side information, its wrapped blocks replaced by this
    peer's own θ (`own_fast`: no pull there, as `outer_step` does), and the fraction of values that wrapped.
    `read_lattice` with that patch applied a block at a time: no mask the size of the model."""
    names, scratch, sides, peaks = _sides(message, slow, config)
    values: Named = {}
    wrapped = total = 0
    for index, name in enumerate(names):
        out = values[name] = torch.empty(slow[name].shape, dtype=torch.float32)
        flat, own = out.view(-1).numpy(), flat32(own_fast[name])
        for start, stop, _, blocks in _decode(
            message, index, sides[name], peaks[name], config, scratch, flat
        ):
            for block in np.flatnonzero(blocks).tolist():
                lo, hi = start + block * CHECK_BLOCK, min(stop, start + (block + 1) * CHECK_BLOCK)
                flat[lo:hi] = own[lo:hi]
                wrapped += hi - lo
        total += flat.size
    return values, wrapped / max(1, total)


def _sides(
    message: Message, slow: Mapping[str, torch.Tensor], config: OuterConfig
) -> tuple[list[str], quant.Scratch, dict[str, np.ndarray], dict[str, float]]:
    """The tensors' names in wire order, a decode scratch, this peer's φ as the decode's side information
    (flat float32 views) and each tensor's peak |φ|, once `message`'s codes are checked against them
    (OuterMessageError otherwise)."""
    names = sorted(slow)
    scratch = quant.Scratch()
    sides = {name: flat32(slow[name]) for name in names}
    peaks = {name: abs_max(sides[name], None, scratch) for name in names}
    _check_codes(message, sides, peaks, config)
    return names, scratch, sides, peaks


def _check_codes(
    message: Message, sides: Mapping[str, np.ndarray], peaks: Mapping[str, float], config: OuterConfig
) -> None:
    """Refuse a message whose codes do not fit this peer's layout (before anything is decoded)."""
    if not len(message.tensors) == len(message.steps) == len(message.checks) == len(sides):
        raise OuterMessageError(
            f"compressed-noloco message from {message.origin} does not match the model's tensors"
        )
    bits = config.lattice_bits
    for name, raw, step, check in zip(
        sorted(sides), message.tensors, message.steps, message.checks, strict=True
    ):
        count = sides[name].size
        if (
            len(raw) != quant.packed_bits(count, bits)
            or len(check) != check_bytes(count)
            or not (step > 0 and np.isfinite(step))
            or peaks[name] + 1.0 > MAX_INDEX * step
        ):
            raise OuterMessageError(f"compressed-noloco message from {message.origin}: bad code for {name!r}")


def _decode(
    message: Message,
    index: int,
    side: np.ndarray,
    peak: float,
    config: OuterConfig,
    scratch: quant.Scratch,
    out: np.ndarray | None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """quant.decode_chunks of tensor #index of a checked message."""
    step = message.steps[index]
    return quant.decode_chunks(
        message.tensors[index],
        step,
        side,
        config.lattice_bits,
        quant.Dither(step, dither_seed(message.origin, message.round, index)),
        message.checks[index],
        out,
        nan_side=bool(np.isnan(peak)),
        scratch=scratch,
    )
