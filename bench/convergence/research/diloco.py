"""DiLoCo (arXiv 2311.08105): outer Nesterov SGD on the averaged pseudo-gradient.

See docs/outer-methods.md, DiLoCo. A research baseline: every peer's fp32 Δ is averaged over all peers (an
all-reduce), which the daemon does not do. The step is exactly
`torch.optim.SGD(lr=η, momentum=μ, nesterov=True, dampening=0)` with grad = Δ̄ (pitfall P2: PyTorch's
Nesterov, not heavy-ball):  m ← μ·m + Δ̄;  φ ← φ − η·(Δ̄ + μ·m).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shoal.gossip.outer.methods import OuterConfig, OuterState
from shoal.gossip.outer.tensors import (
    Named,
    check_same_layout,
    dense_tensors,
    pseudo_gradient,
    read_dense,
)
from shoal.gossip.outer.wire import Message, pack, unpack

# Tuned on the convergence benchmark's CI config (`python -m bench.convergence --sweep`, seed 0):
# η = 0.2 / 0.3 / 0.4 / 0.55 gave 2.395 / 2.332 / 2.346 / 2.406; the paper's 0.7 overshoots at this size.
DEFAULT_LR = 0.3
DEFAULT_MOMENTUM = 0.9


def nesterov_step(
    slow: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    lr: float = DEFAULT_LR,
    mu: float = DEFAULT_MOMENTUM,
) -> tuple[Named, Named]:
    """One outer step. Returns (new slow weights, new momentum buffer); inputs are not modified."""
    check_same_layout(slow, mean_delta, "averaged pseudo-gradient")
    check_same_layout(slow, momentum, "outer momentum")
    new_slow: Named = {}
    new_momentum: Named = {}
    for name, phi in slow.items():
        g = mean_delta[name].float()
        m = mu * momentum[name].float() + g
        new_momentum[name] = m
        new_slow[name] = (phi.float() - lr * (g + mu * m)).to(phi.dtype)
    return new_slow, new_momentum


def ring_allreduce_bytes(n_params: int, n_peers: int, bytes_per_value: int = 4) -> float:
    """Bytes each peer sends in one ring all-reduce of n_params values: 2(R−1)/R · N · b."""
    if n_peers <= 1:
        return 0.0
    return 2 * (n_peers - 1) / n_peers * n_params * bytes_per_value


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """Δ = φ − θ in fp32, sorted-name order."""
    delta = pseudo_gradient(state.slow, fast)
    return pack(Message(config.method, state.origin, state.round, tensors=dense_tensors(delta)))


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    return len(message)


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """Mean Δ over this peer and every other peer, then the Nesterov step; sets state.slow, state.momentum."""
    mine = unpack(own, config.method)
    theirs = [unpack(m, config.method) for m in received]
    slow = state.slow
    deltas = [read_dense(m, slow) for m in [mine, *theirs]]
    mean = {n: sum(d[n] for d in deltas) / len(deltas) for n in slow}
    state.slow, state.momentum = nesterov_step(slow, mean, state.momentum, config.lr, config.momentum)
    return state.slow
