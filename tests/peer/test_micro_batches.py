"""An inner step takes its batch a micro-batch at a time (at most MICRO_BATCH_TOKENS tokens of activations at
once, gradients summed): the same step, to float rounding, as one pass over the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.peer.worker import train
from shoal.peer.worker.train import Trainer, TrainSettings


def settings(data: Path) -> TrainSettings:
    return TrainSettings(
        model="nano", inner_steps=3, batch_size=32, lr=3e-3, warmup_steps=2, total_steps=100,
        weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, method="default", data=str(data), rounds=None, shard=[0, 1],
        init_seed=7, data_seed=7, peer_id="peer-a", overlap="off",
    )  # fmt: skip


def test_a_step_in_micro_batches_is_the_step_of_one_pass(corpus, monkeypatch):
    whole, micro = Trainer(settings(corpus)), Trainer(settings(corpus))
    block = whole.model.config.block_size
    norms: list[float] = []  # each step's gradient norm before clipping (Adam would hide a wrong scale)
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm):
        norms.append(float(clip(parameters, max_norm)))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    monkeypatch.setattr(train, "MICRO_BATCH_TOKENS", 32 * block)  # the whole batch at once
    whole_losses = [whole.train_step() for _ in range(3)]
    monkeypatch.setattr(train, "MICRO_BATCH_TOKENS", 5 * block)  # 5, 5, ..., 2 windows: uneven parts
    micro_losses = [micro.train_step() for _ in range(3)]
    assert micro_losses == pytest.approx(whole_losses, rel=1e-5)
    assert norms[3:] == pytest.approx(norms[:3], rel=1e-4)
    # And the first step's gradient is the plain one of the batch's mean loss, computed here by hand.
    twin = Trainer(settings(corpus))
    x, y = twin.sampler.next()
    _, loss = twin.model(x, y)
    loss.backward()
    by_hand = torch.norm(torch.stack([p.grad.norm() for p in twin.model.parameters()]))
    assert norms[3] == pytest.approx(float(by_hand), rel=1e-4)
    assert micro_losses[0] == pytest.approx(loss.item())
    for a, b in zip(whole.model.parameters(), micro.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()  # Adam steps of 3e-3: 1e-6 of rounding
    # Not the same computation: the parts really went through one at a time.
    assert any(
        not torch.equal(a, b) for a, b in zip(whole.model.parameters(), micro.model.parameters(), strict=True)
    )
