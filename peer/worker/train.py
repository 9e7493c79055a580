"""The worker's training state and its two loops: H inner AdamW steps, then one outer step.

Read top to bottom, as nanoGPT's train.py: build model and data, step the inner optimizer on local
batches (warmup + cosine driven by the global inner-step count), and at each round boundary combine
our fast weights with the partner's and move the slow weights.

The walking skeleton's outer step is NoLoCo's (research-algorithms.md section 2.3) with beta == gamma,
which needs only the partner's fast weights theta_j:
    theta_bar = (theta_i + theta_j) / 2            (theta_i alone when the round had no partner)
    delta     = alpha * delta + beta * (theta_bar - phi)
    phi       = phi + delta;  theta = phi
Averaging with the partner is what pulls replicas together; momentum carries progress across rounds.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.errors import ShoalError
from peer.worker.data import (
    BatchSampler,
    fixed_windows,
    load_stdlib_corpus,
    load_text_corpus,
    shard,
    text_files_under,
)
from peer.worker.model import GPT, PRESETS
from peer.worker.presets import peer_number

CHECKPOINT_FORMAT = 1
EVAL_SEED = 1234  # the same evaluation windows on every peer of every run on this corpus
DEFAULT_SHARDS = 16


class CheckpointError(ShoalError):
    """A checkpoint cannot be read, or belongs to another model."""


@dataclass(frozen=True)
class TrainSettings:
    model: str
    inner_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    eval_windows: int
    seed: int
    threads: int
    outer_momentum: float
    outer_lr: float
    data: str | None
    rounds: int | None
    shard: list[int] | None
    init_seed: int
    peer_id: str

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        return cls(**values)


class Trainer:
    def __init__(self, settings: TrainSettings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.init_seed)
        self.model = GPT(PRESETS[settings.model])
        block = self.model.config.block_size

        files = text_files_under(Path(settings.data)) if settings.data else None
        corpus = load_text_corpus(files) if files else load_stdlib_corpus()
        self.corpus_sha256 = corpus.sha256
        index, count = settings.shard or (peer_number(settings.peer_id, DEFAULT_SHARDS), DEFAULT_SHARDS)
        self.shard = (index, count)
        self.sampler = BatchSampler(
            shard(corpus.train, index, count, block + 2), block, settings.batch_size, settings.init_seed
        )
        self.eval_x, self.eval_y = fixed_windows(corpus.validation, block, settings.eval_windows, EVAL_SEED)

        params = dict(self.model.named_parameters())
        self.names = list(params)
        # Weight decay on matrices only (embeddings and linear weights), as nanoGPT does.
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.lr,
            betas=(0.9, 0.95),
        )
        self.slow = [p.detach().clone() for p in params.values()]  # phi
        self.momentum = [torch.zeros_like(p) for p in self.slow]  # delta, NoLoCo's outer momentum
        self.inner_step = 0
        self.round = 0

    # --- shapes and flat views, for payloads -------------------------------------------------------
    def spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in self.model.named_parameters()]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.slow)

    def fast_vector(self) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).numpy()

    # --- inner loop -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0.1x over the run, by the global inner-step count."""
        s = self.settings
        total = s.rounds * s.inner_steps if s.rounds else s.total_steps
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.inner_step)
        x, y = self.sampler.next()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.inner_step += 1
        return loss.item()

    @torch.no_grad()
    def evaluate(self, weights: list[torch.Tensor] | None = None) -> float:
        """Mean loss (nats per byte) on the run's fixed validation windows, of `weights` or of phi."""
        self.model.eval()
        backup = [p.detach().clone() for p in self.model.parameters()]
        self._load(weights if weights is not None else self.slow)
        losses = [
            self.model(x, y)[1].item()
            for x, y in zip(self.eval_x.split(16), self.eval_y.split(16), strict=True)
        ]
        self._load(backup)
        return float(np.mean(losses))

    # --- outer step -------------------------------------------------------------------------------
    @torch.no_grad()
    def outer_step(self, partner_fast: np.ndarray | None) -> None:
        own = [p.detach().clone() for p in self.model.parameters()]
        if partner_fast is None:
            target = own
        else:
            theirs = self._unflatten(partner_fast)
            target = [(a + b) / 2 for a, b in zip(own, theirs, strict=True)]
        alpha, beta = self.settings.outer_momentum, self.settings.outer_lr
        for phi, delta, theta_bar in zip(self.slow, self.momentum, target, strict=True):
            delta.mul_(alpha).add_(theta_bar - phi, alpha=beta)
            phi.add_(delta)
        self._load(self.slow)
        self.round += 1

    def _unflatten(self, flat: np.ndarray) -> list[torch.Tensor]:
        tensor = torch.from_numpy(flat)
        out, offset = [], 0
        for p in self.slow:
            out.append(tensor[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    @torch.no_grad()
    def _load(self, weights: list[torch.Tensor]) -> None:
        for p, w in zip(self.model.parameters(), weights, strict=True):
            p.copy_(w)

    # --- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed peer needs to continue exactly where it stopped (research notes, P20)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "round": self.round,
            "inner_step": self.inner_step,
            "names": self.names,
            "model": self.settings.model,
            "corpus_sha256": self.corpus_sha256,
            "shard": list(self.shard),
            "slow": [t.clone() for t in self.slow],
            "fast": [p.detach().clone() for p in self.model.parameters()],
            "momentum": [t.clone() for t in self.momentum],
            "optimizer": self.optimizer.state_dict(),
            "sampler_rng": self.sampler.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {state.get('format')!r}, this worker reads {CHECKPOINT_FORMAT}"
            )
        if state["names"] != self.names or state["model"] != self.settings.model:
            raise CheckpointError(
                f"the checkpoint holds model {state['model']!r}, not {self.settings.model!r}; "
                "start with another --state-dir or the same --model"
            )
        with torch.no_grad():
            for target, source in zip(self.slow, state["slow"], strict=True):
                target.copy_(source)
            for target, source in zip(self.momentum, state["momentum"], strict=True):
                target.copy_(source)
            self._load(state["fast"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.generator.set_state(state["sampler_rng"])
        self.round, self.inner_step = int(state["round"]), int(state["inner_step"])

    def save(self, path: Path) -> None:
        """Writes the checkpoint atomically: a temporary file in the same folder, fsync, then rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(self.state_dict(), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"cannot read checkpoint {path}: {str(error)[:200]}") from error
        self.load_state_dict(state)
