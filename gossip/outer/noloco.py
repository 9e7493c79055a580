"""NoLoCo (arXiv 2506.10911): pairwise modified Nesterov, no collective (docs/outer-methods.md, NoLoCo).

Per peer i with partner j:  Δ̄ = (Δ_i + Δ_j)/2;  φ̄ = (φ_i + φ_j)/2;
δ_i ← α·δ_i − β·Δ̄ − γ·(φ_i − φ̄);  φ_i ← φ_i + δ_i.
With β = γ (the released code) −β·Δ̄ − γ·(φ_i − φ̄) = β·(θ̄ − φ_i), θ̄ = (θ_i + θ_j)/2, so each side only needs
the partner's fast weights θ_j: one model-size message each way. A peer that sits the round out (odd counts,
partner lost) uses its own values for the pair means, which makes its step plain heavy-ball on Δ_i.

The `noloco` method sends θ in fp32 (`make_message` / `outer_step`, called through `methods`);
`compressed_noloco` sends the same θ as a lattice code and shares `noloco_step_from_fast`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.tensors import Named, check_same_layout, dense_tensors, read_dense
from shoal.gossip.outer.wire import Message, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState

# NoLoCo reference hyper-parameters (gensyn-ai/noloco configs): outer momentum α, outer lr β, averaging γ.
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.7
DEFAULT_GAMMA = 0.7


def noloco_step(
    slow: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    partner_slow: Mapping[str, torch.Tensor] | None,
    partner_delta: Mapping[str, torch.Tensor] | None,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
) -> tuple[Named, Named]:
    """One NoLoCo outer step for peer i. Returns (new φ_i, new δ_i); inputs are not modified."""
    check_same_layout(slow, delta, "pseudo-gradient")
    check_same_layout(slow, momentum, "outer momentum")
    if partner_slow is not None:
        check_same_layout(slow, partner_slow, "partner slow weights")
    if partner_delta is not None:
        check_same_layout(slow, partner_delta, "partner pseudo-gradient")
    new_slow: Named = {}
    new_momentum: Named = {}
    for name, phi in slow.items():
        phi32 = phi.float()
        d = delta[name].float()
        d_bar = d if partner_delta is None else (d + partner_delta[name].float()) / 2
        pull = 0.0 if partner_slow is None else phi32 - (phi32 + partner_slow[name].float()) / 2
        m = alpha * momentum[name].float() - beta * d_bar - gamma * pull
        new_momentum[name] = m
        new_slow[name] = (phi32 + m).to(phi.dtype)
    return new_slow, new_momentum


def noloco_step_from_fast(
    slow: Mapping[str, torch.Tensor],
    fast: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    partner_fast: Mapping[str, torch.Tensor] | None,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> tuple[Named, Named]:
    """The β = γ form: only the partner's fast weights θ_j are needed. δ ← α·δ + β·(θ̄ − φ_i)."""
    check_same_layout(slow, fast, "fast weights")
    check_same_layout(slow, momentum, "outer momentum")
    if partner_fast is not None:
        check_same_layout(slow, partner_fast, "partner fast weights")
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


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """θ in fp32, sorted-name order: what the partner needs for the β = γ step."""
    check_same_layout(state.slow, fast, "fast weights")
    return pack(Message(config.method, state.origin, state.round, tensors=dense_tensors(fast)))


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """δ ← α·δ + β·(θ̄ − φ); φ ← φ + δ with the partner's θ (own values when sitting out). Sets state."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"noloco pairs with one partner, got {len(theirs)} messages")
    fast = read_dense(mine, state.slow)
    partner = read_dense(theirs[0], state.slow) if theirs else None
    state.slow, state.momentum = noloco_step_from_fast(
        state.slow, fast, state.momentum, partner, config.momentum, config.lr
    )
    return state.slow
