"""DiLoCo (arXiv 2311.08105): outer Nesterov SGD on the averaged pseudo-gradient (research notes 2.1).

The step is exactly `torch.optim.SGD(lr=η, momentum=μ, nesterov=True, dampening=0)` with grad = Δ̄
(pitfall P2: PyTorch's Nesterov, not heavy-ball):  m ← μ·m + Δ̄;  φ ← φ − η·(Δ̄ + μ·m).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shoal.gossip.outer.tensors import Named, check_same_layout

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
    """Bytes each peer sends in one ring all-reduce of n_params values: 2(R−1)/R · N · b (notes 3.5)."""
    if n_peers <= 1:
        return 0.0
    return 2 * (n_peers - 1) / n_peers * n_params * bytes_per_value
