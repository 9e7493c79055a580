"""V-B pair SparseLoCo: partners apply the same contributor-mean of their two sparse messages, then pull φ
toward the pair mean on a rotating 1/F slice (docs/outer-methods.md, V-B pair).

The message is SparseLoCo's (`sparseloco.compress`: error feedback + codec) plus this round's consensus slice
of φ, coded in `consensus_bits` either as block absmax (error ∝ the weights) or as a modulo-lattice code read
against the receiver's own φ (error ∝ the step, sized to cover consensus_range · max|Δ|).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from shoal.gossip.outer import quant, sparseloco
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.tensors import Named, all_finite, pseudo_gradient
from shoal.gossip.outer.wire import Message, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState


def consensus_slice(numel: int, round_: int, every: int) -> slice:
    """The rotating 1/F slice of a flat tensor pulled together this round (strided: spreads over rows)."""
    return slice(round_ % every, numel, every)


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """The sparse update of Δ (folds Δ into the EF buffer: state.error changes) and this round's φ slice."""
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
            q = quant.lattice_encode(part, step, config.consensus_bits)
        else:
            s, q = quant.absmax_encode(part, config.consensus_bits)
        scales.append(s.numpy().tobytes())
        codes.append(q.numpy().tobytes())
    msg.consensus = {"s": scales, "q": codes}
    return pack(msg)


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    """Bytes this message would take with the consensus codes bit-packed: the figure a real link carries.

    The consensus codes are held one per byte in the message; the wire size counts them at their bit width.
    """
    if config.consensus_bits < 8:
        msg = unpack(message, config.method)
        n = sum(len(q) for q in (msg.consensus or {}).get("q", []))
        return len(message) - n + quant.packed_bits(n, config.consensus_bits)
    return len(message)


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """φ ← φ − α·contributor-mean(own, partner), then the consensus pull on this round's slice."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"pair-sparseloco pairs with one partner, got {len(theirs)} messages")
    slow = state.slow
    decoded = [sparseloco.decode_message(m, slow) for m in [mine, *theirs]]
    partner_slices = _partner_slices(config, state, theirs[0]) if theirs else {}
    new = sparseloco.apply(slow, sparseloco.contributor_mean(decoded), config.lr)
    for name, other in partner_slices.items():
        sl = consensus_slice(slow[name].numel(), state.round, config.consensus_every)
        flat = new[name].reshape(-1)
        own_old = slow[name].reshape(-1)[sl]
        # Pull toward the pair mean of the pre-update φ; both sides applied the same sparse update U.
        flat[sl] -= config.gamma * (own_old - (own_old + other) / 2)
    state.slow = new
    return new


def _partner_slices(config: OuterConfig, state: OuterState, partner: Message) -> dict[str, torch.Tensor]:
    """The partner's φ on this round's slice of every tensor, decoded and checked."""
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
        n_scales = 1 if lattice else (n + quant.BLOCK - 1) // quant.BLOCK
        if len(q_raw) != n or len(s_raw) != 4 * n_scales:
            raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has the wrong size")
        s = torch.from_numpy(np.frombuffer(s_raw, dtype=np.float32).copy())
        q = torch.from_numpy(np.frombuffer(q_raw, dtype=np.uint8).copy())
        if not lattice:
            out[name] = quant.absmax_decode(s, q, config.consensus_bits)
            continue
        step = float(s[0])
        if not (step > 0 and np.isfinite(step)):
            raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has step {step}")
        own = slow[name].reshape(-1)[sl].float()
        other = quant.lattice_decode(q, step, own, config.consensus_bits)
        # Near the edge of the lattice's reach a value may have wrapped: pull only where it cannot have.
        trusted = (other - own).abs() < 0.75 * step * 2 ** (config.consensus_bits - 1)
        out[name] = torch.where(trusted, other, own)
    if not all_finite(out):
        raise OuterMessageError(f"pair-sparseloco consensus from {partner.origin} is not finite")
    return out
