"""Shared fixtures: a small real model (not the GPT: invariances hold for any parameters) and its data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn


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


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers above (importlib mode cannot import conftest from a test module)."""
    return SimpleNamespace(
        make_model=make_model, batches=batches, train_step=train_step, weights=weights, load=load
    )
