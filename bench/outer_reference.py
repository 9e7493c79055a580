"""Frozen copy of the outer methods' codes as they were before issue 17 ("Fast codes"): the baseline.

`bench.outer_speed` times it against the product, and tests/outer/test_fast_codes.py checks that the
product's bytes and decoded values still match it. Never used by the product; do not "fix" it: its
float64/int64 temporaries per parameter are the point. Copied from gossip/outer/quant.py,
compressed_noloco.py, noloco.py and pair_sparseloco.py; `make_message` / `outer_step` here take the same
arguments as the product's modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shoal.gossip.outer import sparseloco
from shoal.gossip.outer.compressed_noloco import MAX_INDEX, check_steps, dither_seed, lattice_step
from shoal.gossip.outer.config import OuterConfig, OuterState
from shoal.gossip.outer.errors import OuterError, OuterMessageError
from shoal.gossip.outer.tensors import Named, all_finite, check_same_layout, pseudo_gradient
from shoal.gossip.outer.wire import CHECK_BLOCK, Message, check_bytes, pack, packed_bits, unpack

# ---- gossip/outer/quant.py ----


def _splitmix16(index: int) -> int:
    z = (index + 1) * 0x9E3779B97F4A7C15 % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return (z ^ (z >> 31)) & 0xFFFF


_CHECK_WEIGHTS = torch.tensor([_splitmix16(i) | 1 for i in range(CHECK_BLOCK)], dtype=torch.int64)
ABSMAX_BLOCK = 64


def absmax_encode(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % ABSMAX_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, ABSMAX_BLOCK)
    levels = 2 ** (bits - 1) - 1
    scales = blocks.abs().amax(dim=1).clamp_min(1e-30) / levels
    codes = torch.round(blocks / scales[:, None]).clamp(-levels, levels) + levels
    return scales, codes.reshape(-1)[: flat.numel()].to(torch.uint8)


def absmax_decode(scales: torch.Tensor, codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    values = codes.float() - levels
    return values * scales.repeat_interleave(ABSMAX_BLOCK)[: codes.numel()]


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    fields = np.unpackbits(flat.reshape(-1, 1), axis=1)[:, 8 - bits :]
    return np.packbits(fields.reshape(-1)).tobytes()


def unpack_codes(raw: bytes, count: int, bits: int) -> torch.Tensor:
    fields = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = fields
    return torch.from_numpy(np.packbits(padded, axis=1).reshape(-1))


def lattice_dither(count: int, step: float, seed: int) -> torch.Tensor:
    raw = np.random.PCG64(seed).random_raw(count)
    unit = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5
    return torch.from_numpy(unit) * step


def _dither_like(x: torch.Tensor, dither: torch.Tensor | None) -> torch.Tensor | float:
    return 0.0 if dither is None else dither.reshape(-1).double()


def lattice_indices(x: torch.Tensor, step: float, dither: torch.Tensor | None = None) -> torch.Tensor:
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    flat = x.detach().double().reshape(-1)
    return torch.round((flat + _dither_like(flat, dither)) / step).long()


def lattice_encode(
    x: torch.Tensor, step: float, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    k = lattice_indices(x, step, dither)
    return torch.remainder(k, 2**bits).to(torch.uint8).view(x.shape)


def lattice_decode_indices(
    codes: torch.Tensor, step: float, side: torch.Tensor, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    modulus = 2**bits
    flat_side = side.detach().double().reshape(-1)
    target = (flat_side + _dither_like(flat_side, dither)) / step
    c = codes.reshape(-1).long()
    return c + modulus * torch.round((target - c) / modulus).long()


def lattice_values(k: torch.Tensor, step: float, dither: torch.Tensor | None = None) -> torch.Tensor:
    return k.double() * step - _dither_like(k, dither)


def lattice_decode(
    codes: torch.Tensor, step: float, side: torch.Tensor, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    k = lattice_decode_indices(codes, step, side, bits, dither)
    return lattice_values(k, step, dither).to(torch.float32).view(side.shape)


def block_checks(k: torch.Tensor) -> bytes:
    flat = torch.remainder(k.reshape(-1).long(), 2**16)
    pad = (-flat.numel()) % CHECK_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, CHECK_BLOCK)
    sums = torch.remainder((blocks * _CHECK_WEIGHTS).sum(dim=1), 2**16)
    return sums.numpy().astype("<u2").tobytes()


def wrapped_blocks(k: torch.Tensor, checks: bytes) -> torch.Tensor:
    sent = torch.from_numpy(np.frombuffer(checks, dtype="<u2").astype(np.int64))
    got = torch.from_numpy(np.frombuffer(block_checks(k), dtype="<u2").astype(np.int64))
    return sent != got


def block_mask(blocks: torch.Tensor, count: int) -> torch.Tensor:
    return blocks.repeat_interleave(CHECK_BLOCK)[:count]


# ---- gossip/outer/tensors.py ----


def dense_tensors(named: Mapping[str, torch.Tensor]) -> list[bytes]:
    return [named[n].detach().float().contiguous().numpy().tobytes() for n in sorted(named)]


def read_dense(message: Message, like: Mapping[str, torch.Tensor]) -> Named:
    names = sorted(like)
    if len(message.tensors) != len(names):
        raise OuterMessageError(f"message from {message.origin} has the wrong number of tensors")
    out: Named = {}
    for name, raw in zip(names, message.tensors, strict=True):
        if len(raw) != 4 * like[name].numel():
            raise OuterMessageError(f"message from {message.origin}: tensor {name!r} has the wrong size")
        out[name] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(like[name].shape)
    if not all_finite(out):
        raise OuterMessageError(f"message from {message.origin} carries non-finite values; dropped")
    return out


# ---- gossip/outer/noloco.py ----


def noloco_step_from_fast(
    slow: Mapping[str, torch.Tensor],
    fast: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    partner_fast: Mapping[str, torch.Tensor] | None,
    alpha: float,
    beta: float,
) -> tuple[Named, Named]:
    check_same_layout(slow, fast, "fast weights")
    new_slow: Named = {}
    new_momentum: Named = {}
    for name, phi in slow.items():
        phi32 = phi.float()
        theta = fast[name].float()
        theta_bar = theta if partner_fast is None else (theta + partner_fast[name].float()) / 2
        m = alpha * momentum[name].float() + beta * (theta_bar - phi32)
        new_momentum[name] = m
        new_slow[name] = (phi32 + m).to(phi.dtype)
    return new_slow, new_momentum


class NoLoCo:
    """noloco.make_message / outer_step as they were."""

    @staticmethod
    def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
        check_same_layout(state.slow, fast, "fast weights")
        return pack(Message(config.method, state.origin, state.round, tensors=dense_tensors(fast)))

    @staticmethod
    def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
        mine = unpack(own, config.method)
        theirs = [unpack(m, config.method) for m in received]
        fast = read_dense(mine, state.slow)
        partner = read_dense(theirs[0], state.slow) if theirs else None
        state.slow, state.momentum = noloco_step_from_fast(
            state.slow, fast, state.momentum, partner, config.momentum, config.lr
        )
        return state.slow

    @staticmethod
    def decode(config: OuterConfig, state: OuterState, message: bytes) -> Named:
        return read_dense(unpack(message, config.method), state.slow)


# ---- gossip/outer/compressed_noloco.py ----


@dataclass
class Decoded:
    values: Named
    wrapped: dict[str, torch.Tensor]


def read_lattice(message: Message, slow: Mapping[str, torch.Tensor], config: OuterConfig) -> Decoded:
    names = sorted(slow)
    if not len(message.tensors) == len(message.steps) == len(message.checks) == len(names):
        raise OuterMessageError(f"compressed-noloco message from {message.origin} does not match the model")
    bits = config.lattice_bits
    values: Named = {}
    wrapped: dict[str, torch.Tensor] = {}
    for index, (name, raw, step, check) in enumerate(
        zip(names, message.tensors, message.steps, message.checks, strict=True)
    ):
        count = slow[name].numel()
        side = slow[name].float()
        if (
            len(raw) != packed_bits(count, bits)
            or len(check) != check_bytes(count)
            or not (step > 0 and np.isfinite(step))
            or float(side.abs().max()) + 1.0 > MAX_INDEX * step
        ):
            raise OuterMessageError(f"compressed-noloco message from {message.origin}: bad code for {name!r}")
        codes = unpack_codes(raw, count, bits)
        dither = lattice_dither(count, step, dither_seed(message.origin, message.round, index))
        k = lattice_decode_indices(codes, step, side, bits, dither)
        values[name] = lattice_values(k, step, dither).to(torch.float32).view(side.shape)
        wrapped[name] = block_mask(wrapped_blocks(k, check), count).view(side.shape)
    return Decoded(values, wrapped)


def _track(config: OuterConfig, state: OuterState, decoded: Decoded, steps: Sequence[float]) -> None:
    window_steps = 2 ** (config.lattice_bits - 1)
    counters = state.counters
    for name, step in zip(sorted(state.slow), steps, strict=True):
        wrapped = decoded.wrapped[name]
        n_wrapped = int(wrapped.sum())
        counters["lattice_values"] = counters.get("lattice_values", 0) + wrapped.numel()
        counters["lattice_wrapped"] = counters.get("lattice_wrapped", 0) + n_wrapped
        gap = (decoded.values[name] - state.slow[name].float()).abs().masked_fill(wrapped, 0.0)
        seen = float(gap.max()) if gap.numel() else 0.0
        if n_wrapped:
            seen = max(seen, window_steps * step)
        state.drift[name] = max(seen, 0.9 * state.drift.get(name, 0.0))


class CompressedNoLoCo:
    """compressed_noloco.make_message / outer_step as they were."""

    @staticmethod
    def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
        delta = pseudo_gradient(state.slow, fast)
        bits = config.lattice_bits
        steps, codes, checks = [], [], []
        for index, name in enumerate(sorted(state.slow)):
            step = lattice_step(config, state, name, float(delta[name].abs().max()))
            x = fast[name].float()
            dither = lattice_dither(x.numel(), step, dither_seed(state.origin, state.round, index))
            k = lattice_indices(x, step, dither)
            steps.append(step)
            codes.append(pack_codes(torch.remainder(k, 2**bits).to(torch.uint8), bits))
            checks.append(block_checks(k))
        msg = Message(config.method, state.origin, state.round, tensors=codes, steps=steps, checks=checks)
        return pack(msg)

    @staticmethod
    def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
        mine = unpack(own, config.method)
        theirs = [unpack(m, config.method) for m in received]
        slow = state.slow
        own_decoded = read_lattice(mine, slow, config)
        if any(bool(w.any()) for w in own_decoded.wrapped.values()):
            raise OuterError("this peer's own lattice message does not decode: lattice_range is too small")
        fast = own_decoded.values
        partner: Named | None = None
        if theirs:
            check_steps(theirs[0], mine.steps)
            decoded = read_lattice(theirs[0], slow, config)
            partner = {n: torch.where(decoded.wrapped[n], fast[n], decoded.values[n]) for n in fast}
            _track(config, state, decoded, theirs[0].steps)
        state.slow, state.momentum = noloco_step_from_fast(
            slow, fast, state.momentum, partner, config.momentum, config.lr
        )
        return state.slow

    @staticmethod
    def decode(config: OuterConfig, state: OuterState, message: bytes) -> Named:
        return read_lattice(unpack(message, config.method), state.slow, config).values


# ---- gossip/outer/pair_sparseloco.py ----


def consensus_slice(numel: int, round_: int, every: int) -> slice:
    return slice(round_ % every, numel, every)


def _partner_slices(config: OuterConfig, state: OuterState, partner: Message) -> dict[str, torch.Tensor]:
    slow = state.slow
    out: dict[str, torch.Tensor] = {}
    cons = partner.consensus or {}
    scales, codes = cons.get("s", []), cons.get("q", [])
    names = sorted(slow)
    if len(scales) != len(names) or len(codes) != len(names):
        raise OuterMessageError(f"pair-sparseloco message from {partner.origin} lacks a consensus slice")
    for name, s_raw, q_raw in zip(names, scales, codes, strict=True):
        sl = consensus_slice(slow[name].numel(), state.round, config.consensus_every)
        n = len(range(*sl.indices(slow[name].numel())))
        lattice = config.consensus_code == "lattice"
        n_scales = 1 if lattice else (n + ABSMAX_BLOCK - 1) // ABSMAX_BLOCK
        if len(q_raw) != n or len(s_raw) != 4 * n_scales:
            raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has the wrong size")
        s = torch.from_numpy(np.frombuffer(s_raw, dtype=np.float32).copy())
        q = torch.from_numpy(np.frombuffer(q_raw, dtype=np.uint8).copy())
        if not lattice:
            out[name] = absmax_decode(s, q, config.consensus_bits)
            continue
        step = float(s[0])
        if not (step > 0 and np.isfinite(step)):
            raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has step {step}")
        own = slow[name].reshape(-1)[sl].float()
        other = lattice_decode(q, step, own, config.consensus_bits)
        trusted = (other - own).abs() < 0.75 * step * 2 ** (config.consensus_bits - 1)
        out[name] = torch.where(trusted, other, own)
    if not all_finite(out):
        raise OuterMessageError(f"pair-sparseloco consensus from {partner.origin} is not finite")
    return out


class PairSparseLoCo:
    """pair_sparseloco.make_message / outer_step as they were."""

    @staticmethod
    def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
        delta = pseudo_gradient(state.slow, fast)
        msg = Message(config.method, state.origin, state.round)
        msg.update, state.error = sparseloco.compress(delta, state.error, config.codec, config.ef_beta)
        scales, codes = [], []
        for name in sorted(state.slow):
            part = state.slow[name].reshape(-1)[
                consensus_slice(state.slow[name].numel(), state.round, config.consensus_every)
            ]
            if config.consensus_code == "lattice":
                d = delta[name].reshape(-1)[
                    consensus_slice(delta[name].numel(), state.round, config.consensus_every)
                ]
                reach = config.consensus_range * (float(d.abs().max()) if d.numel() else 0.0) + 1e-12
                step = reach / 2 ** (config.consensus_bits - 1)
                s = torch.tensor([step], dtype=torch.float32)
                q = lattice_encode(part, step, config.consensus_bits)
            else:
                s, q = absmax_encode(part, config.consensus_bits)
            scales.append(s.numpy().tobytes())
            codes.append(q.numpy().tobytes())
        msg.consensus = {"s": scales, "q": codes}
        return pack(msg)

    @staticmethod
    def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
        mine = unpack(own, config.method)
        theirs = [unpack(m, config.method) for m in received]
        slow = state.slow
        decoded = [sparseloco.decode_message(m, slow) for m in [mine, *theirs]]
        partner_slices = _partner_slices(config, state, theirs[0]) if theirs else {}
        new = sparseloco.apply(slow, sparseloco.contributor_mean(decoded), config.lr)
        for name, other in partner_slices.items():
            sl = consensus_slice(slow[name].numel(), state.round, config.consensus_every)
            flat = new[name].reshape(-1)
            own_old = slow[name].reshape(-1)[sl]
            flat[sl] -= config.gamma * (own_old - (own_old + other) / 2)
        state.slow = new
        return new

    @staticmethod
    def decode(config: OuterConfig, state: OuterState, message: bytes) -> tuple[tuple[Named, Named], dict]:
        msg = unpack(message, config.method)
        return sparseloco.decode_message(msg, state.slow), _partner_slices(config, state, msg)


# The reference implementation of each product method, by name.
REFERENCE = {"noloco": NoLoCo, "compressed-noloco": CompressedNoLoCo, "pair-sparseloco": PairSparseLoCo}
