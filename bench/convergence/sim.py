"""R simulated workers in one process: stacked parameters, one vmapped forward/backward for all of them.

Every weight is stored as [R, ...]; one torch.optim.AdamW over the stacked tensors is exactly R independent
AdamWs (Adam is element-wise), gradients are clipped per worker (norm per slice), and every worker reads its
own shard. The model is the worker's own GPT (`peer.worker.model`), called through
torch.func.functional_call under vmap, so the tensors the outer methods and the codec see have the live
product's names and shapes. The corpus is the worker's standard-library corpus (`peer.worker.data`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, vmap

from shoal.peer.worker.data import BatchSampler, Corpus, fixed_windows, shard
from shoal.peer.worker.model import GPT, GPTConfig

# vmap has no batching rule for the CPU flash-attention kernel and falls back to a loop over replicas; it is
# still faster than R Python loops (measured 70 k vs 51 k tok/s at the CI size), so silence the warning.
warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product.*")


@dataclass(frozen=True)
class SimConfig:
    """Sizes and inner-optimizer settings, the CI config by default.

    See docs/outer-methods.md, Convergence benchmark configuration.
    """

    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    replicas: int = 4
    batch: int = 8
    inner_steps: int = 12  # H
    total_steps: int = 480  # N inner steps per worker
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    eval_windows: int = 64
    eval_every: int = 4  # outer steps between eval points of the curves
    seed: int = 0

    @property
    def outer_steps(self) -> int:
        return self.total_steps // self.inner_steps

    @property
    def tokens_per_step(self) -> int:
        """Tokens all workers consume in one inner step."""
        return self.replicas * self.batch * self.model.block_size


def lr_at(cfg: SimConfig, step: int, total: int) -> float:
    """Linear warmup then cosine to min_lr_frac, indexed by the global inner step (pitfall P11)."""
    warmup = max(1, int(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class Batches:
    """Worker r's batch at inner step s, identical for every method (common random numbers)."""

    def __init__(self, corpus: Corpus, cfg: SimConfig):
        t = cfg.model.block_size
        self.samplers = [
            BatchSampler(shard(corpus.train, r, cfg.replicas, t + 2), t, cfg.batch, seed=cfg.seed * 1000 + r)
            for r in range(cfg.replicas)
        ]
        # Precomputed once per seed: R·N·B·(T+1) int64 is a few MB at the CI size.
        steps = [[s.next() for s in self.samplers] for _ in range(cfg.total_steps)]
        self.x = torch.stack([torch.stack([b[0] for b in row]) for row in steps])  # [N, R, B, T]
        self.y = torch.stack([torch.stack([b[1] for b in row]) for row in steps])
        self.eval_x, self.eval_y = fixed_windows(corpus.validation, t, cfg.eval_windows, seed=1234 + cfg.seed)


def initial_weights(cfg: SimConfig) -> dict[str, torch.Tensor]:
    """One model's initial weights (same for every replica and every method of one seed)."""
    torch.manual_seed(cfg.seed)
    return {k: v.detach().clone() for k, v in GPT(cfg.model).named_parameters()}


class Replicas:
    """R replicas' fast weights as stacked leaf tensors, with their AdamW; φ lives with the caller."""

    def __init__(self, cfg: SimConfig, init: dict[str, torch.Tensor], count: int):
        self.cfg = cfg
        self.count = count
        self.base = GPT(cfg.model).to("meta")
        self.params = {
            k: v.unsqueeze(0).repeat(count, *([1] * v.dim())).requires_grad_() for k, v in init.items()
        }
        # Weight decay on matrices only: stacked matrices have 3 dims.
        decay = [p for p in self.params.values() if p.dim() >= 3]
        other = [p for p in self.params.values() if p.dim() < 3]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            foreach=True,
        )

        def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, (p,), (x, y))[1]

        self._loss = vmap(loss_one)

    def losses(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[R] mean loss of each replica on its own batch x[r]."""
        return self._loss(params, x, y)

    def inner_step(self, lr: float, x: torch.Tensor, y: torch.Tensor, all_reduce: bool = False) -> float:
        """One AdamW step of every replica; `all_reduce` averages gradients first (DDP). Returns mean loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        losses = self.losses(self.params, x, y)
        losses.sum().backward()
        grads = [p.grad for p in self.params.values()]
        if all_reduce:
            for g in grads:
                g.copy_(g.mean(0, keepdim=True).expand_as(g))
        # Per-replica clipping (pitfall P18): the norm of each replica's slice, not of the stack.
        sq = torch.stack([g.pow(2).reshape(self.count, -1).sum(1) for g in grads]).sum(0)
        scale = (self.cfg.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        self.opt.step()
        return float(losses.detach().mean())

    @torch.no_grad()
    def load(self, stacked: dict[str, torch.Tensor]) -> None:
        """θ ← φ for every replica (inner optimizer state persists, as in the reference code)."""
        for k, p in self.params.items():
            p.copy_(stacked[k])

    def replica(self, r: int) -> dict[str, torch.Tensor]:
        return {k: p.detach()[r].clone() for k, p in self.params.items()}


@torch.no_grad()
def evaluate(replicas: Replicas, stacked: dict[str, torch.Tensor], batches: Batches) -> list[float]:
    """Held-out loss (nats/byte) of each of the given stacked weight sets, all on the same fixed windows."""
    count = next(iter(stacked.values())).shape[0]
    x = batches.eval_x.unsqueeze(0).expand(count, -1, -1)
    y = batches.eval_y.unsqueeze(0).expand(count, -1, -1)
    return [float(v) for v in replicas.losses(stacked, x, y)]


def spread(stacked: dict[str, torch.Tensor]) -> float:
    """RMS over all weights and replicas of φ_i − φ̄: how far the replicas drifted apart."""
    total, count = 0.0, 0
    for t in stacked.values():
        d = t - t.mean(0, keepdim=True)
        total += float(d.pow(2).sum())
        count += d.numel()
    return math.sqrt(total / max(1, count))
