"""Shared fixtures: a small real model (not the GPT: invariances hold for any parameters) and its data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shoal.gossip.outer.methods import OuterConfig, OuterState


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(count)]


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    opt.zero_grad()
    x, y = batch
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@torch.no_grad()
def load(model: nn.Module, named: dict[str, torch.Tensor]) -> None:
    for k, p in model.named_parameters():
        p.copy_(named[k])


def model_weights(seed: int) -> dict[str, torch.Tensor]:
    """A two-tensor model big enough for the codec's 64x64 tiles."""
    g = torch.Generator().manual_seed(seed)
    return {"w": 0.05 * torch.randn(96, 64, generator=g), "b": 0.05 * torch.randn(64, generator=g)}


def nudged(slow: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fast weights a little away from `slow`: a stand-in for H inner steps."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in slow.items()}


RunRounds = Callable[[OuterConfig, list[OuterState], int, int], None]


def check_resume(config: OuterConfig, run_rounds: RunRounds, path: Path) -> None:
    """Save after 2 rounds, load, run 2 more: identical to never stopping (EF, store and round included).

    `run_rounds(config, states, rounds, start)` drives the peers `states` with the method's topology.
    """
    straight = [OuterState.fresh(str(i), model_weights(9)) for i in range(3)]
    run_rounds(config, straight, 4, 0)
    resumed = [OuterState.fresh(str(i), model_weights(9)) for i in range(3)]
    run_rounds(config, resumed, 2, 0)
    torch.save([s.state_dict() for s in resumed], path)
    resumed = [OuterState.from_state_dict(d) for d in torch.load(path)]
    run_rounds(config, resumed, 2, 2)
    for a, b in zip(straight, resumed, strict=True):
        assert a.round == b.round == 4 and a.store == b.store
        for k in a.slow:
            assert torch.equal(a.slow[k], b.slow[k]) and torch.equal(a.error[k], b.error[k])
            assert torch.equal(a.momentum[k], b.momentum[k])
        assert a.drift == b.drift and a.counters == b.counters
    assert any(not torch.equal(a.slow[k], model_weights(9)[k]) for a in straight for k in a.slow)


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers above (importlib mode cannot import conftest from a test module)."""
    return SimpleNamespace(
        make_model=make_model,
        batches=batches,
        train_step=train_step,
        weights=weights,
        load=load,
        model_weights=model_weights,
        nudged=nudged,
        check_resume=check_resume,
    )
