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

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.tensors import Named, check_same_layout, dense_tensors
from shoal.gossip.outer.wire import Message, pack, unpack

if TYPE_CHECKING:
    from shoal.gossip.outer.config import OuterConfig, OuterState

# NoLoCo reference hyper-parameters (gensyn-ai/noloco configs): outer momentum α, outer lr β, averaging γ.
ERROR_FEEDBACK = False  # dense: everything is sent every round, nothing left over for later
CONSUMES = True  # outer_step can let the old state go tensor by tensor (methods.outer_step's `consume`)
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


def outer_step(
    config: OuterConfig,
    state: OuterState,
    own: bytes,
    received: Sequence[bytes],
    consume: bool = False,
    weight: float = 1.0,
) -> Named:
    """δ ← α·δ + β·(θ̄ − φ); φ ← φ + δ with the partner's θ (own values when sitting out). Sets state.

    Read in place from the messages' bytes and stepped a chunk at a time (`ChunkStep`): the same bits as
    `noloco_step_from_fast`, and nothing the size of the model but the new φ and δ. With `consume`
    (methods.outer_step) each tensor's old φ and δ leave the state's dicts once its step is done; `weight`:
    the partner's pull, as methods.outer_step's.
    """
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    if len(theirs) > 1:
        raise OuterMessageError(f"noloco pairs with one partner, got {len(theirs)} messages")
    fast = dense_views(mine, state.slow)
    partner = dense_views(theirs[0], state.slow) if theirs else None
    dtypes = {name: phi.dtype for name, phi in state.slow.items()}
    new_slow: Named = {}
    new_momentum: Named = {}
    for name in list(state.slow):
        phi = state.slow[name]
        new_slow[name] = torch.empty(phi.shape, dtype=torch.float32)
        new_momentum[name] = torch.empty(phi.shape, dtype=torch.float32)
        out = new_slow[name].view(-1).numpy()
        np.copyto(out, fast[name])  # θ, which the step overwrites with the new φ a chunk at a time
        pull = ChunkStep(new_momentum[name], out, flat32(phi), flat32(state.momentum[name]), config, weight)
        for start, stop in chunk_bounds(out.size):
            pull.step(start, stop, None if partner is None else partner[name][start:stop])
        if consume:  # nothing refers to this tensor's old φ and δ any more
            del pull, phi, state.slow[name], state.momentum[name]
    state.momentum = new_momentum
    state.slow = {n: t if dtypes[n] == torch.float32 else t.to(dtypes[n]) for n, t in new_slow.items()}
    return state.slow


# Values per chunk of the float32 step: 64 KiB a buffer, in L2.
CHUNK = 1 << 14


def chunk_bounds(count: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, CHUNK):
        yield start, min(count, start + CHUNK)


def flat32(t: torch.Tensor) -> np.ndarray:
    """A flat float32 numpy view of `t` (a copy only when it is not contiguous float32)."""
    return t.detach().float().contiguous().view(-1).numpy()


def dense_views(message: Message, like: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """`tensors.read_dense` without copies: flat read-only float32 views of the message's bytes, checked
    against this peer's layout and for non-finite values (OuterMessageError)."""
    names = sorted(like)
    if len(message.tensors) != len(names):
        raise OuterMessageError(
            f"message from {message.origin} has {len(message.tensors)} tensors, model has {len(names)}"
        )
    out: dict[str, np.ndarray] = {}
    for name, raw in zip(names, message.tensors, strict=True):
        if len(raw) != 4 * like[name].numel():
            raise OuterMessageError(
                f"message from {message.origin}: tensor {name!r} has {len(raw)} bytes, "
                f"expected {4 * like[name].numel()} for shape {tuple(like[name].shape)}"
            )
        out[name] = np.frombuffer(raw, dtype=np.float32)
    for values in out.values():
        for start, stop in chunk_bounds(values.size):
            chunk = values[start:stop]
            # A sum is finite only if every term is; an overflowing sum of finite values takes the slow look.
            if not np.isfinite(chunk.sum()) and not np.isfinite(chunk).all():
                raise OuterMessageError(f"message from {message.origin} carries non-finite values; dropped")
    return out


class ChunkStep:
    """δ ← α·δ + β·(θ̄ − φ); φ ← φ + δ, θ̄ = (θ + θ_partner)/2, on a chunk: `noloco_step_from_fast`'s float32
    operations in its order (the same bits). The new φ is written over θ's chunk, which is read first.
    With a pull `weight` w < 1 (the guard's clip), θ̄ = θ + w·(θ_partner − θ)/2: the step alone moved w of
    the way toward the step with the partner, in one pass (the step is affine in θ_partner)."""

    def __init__(
        self,
        momentum_out: torch.Tensor,
        theta: np.ndarray,
        phi: np.ndarray,
        momentum: np.ndarray,
        config: OuterConfig,
        weight: float = 1.0,
    ) -> None:
        self.m_out, self.theta, self.phi, self.m = momentum_out.view(-1).numpy(), theta, phi, momentum
        self.alpha, self.beta = config.momentum, config.lr
        self.half_weight = np.float32(weight / 2) if weight < 1.0 else None
        self.buf = np.empty(CHUNK, np.float32)

    def step(self, start: int, stop: int, partner: np.ndarray | None) -> None:
        theta, phi = self.theta[start:stop], self.phi[start:stop]
        if self.buf.size < stop - start:  # a caller with longer chunks
            self.buf = np.empty(stop - start, np.float32)
        bar = self.buf[: stop - start]
        if partner is None:
            np.subtract(theta, phi, out=bar)
        elif self.half_weight is None:
            np.add(theta, partner, out=bar)
            bar /= 2
            bar -= phi
        else:
            np.subtract(partner, theta, out=bar)
            bar *= self.half_weight
            bar += theta
            bar -= phi
        bar *= self.beta
        m = np.multiply(self.m[start:stop], self.alpha, out=self.m_out[start:stop])
        m += bar
        np.add(phi, m, out=theta)
