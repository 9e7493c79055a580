"""Activation checkpointing (`--activation-checkpointing`): the same training, bit for bit, with each block's
activations recomputed during backward instead of kept; "auto" turns it on where the activations are large
beside the model (gpt2-small), not where they are small (the presets a CPU trains)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shoal.peer.config import ConfigError, PeerConfig
from shoal.peer.worker.model import GPT, PRESETS, parameter_count
from shoal.peer.worker.train import Trainer, TrainSettings, checkpointing_pays


def settings(data: Path, mode: str) -> TrainSettings:
    return TrainSettings(
        model="nano", inner_steps=3, batch_size=8, lr=3e-3, warmup_steps=2, total_steps=100,
        weight_decay=0.1, eval_windows=8, seed=0, threads=1, method="default", data=str(data), rounds=None,
        shard=[0, 1], init_seed=7, data_seed=7, peer_id="peer-a", overlap="off",
        activation_checkpointing=mode,
    )  # fmt: skip


def test_recomputed_activations_train_the_same_weights(corpus):
    kept, recomputed = Trainer(settings(corpus, "off")), Trainer(settings(corpus, "on"))
    assert (kept.checkpointing, recomputed.checkpointing) == (False, True)
    losses = [[trainer.train_step() for _ in range(3)] for trainer in (kept, recomputed)]
    assert losses[0] == losses[1]
    for a, b in zip(kept.model.parameters(), recomputed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # An evaluation runs without gradients: nothing to recompute, the same loss.
    assert kept.evaluate() == recomputed.evaluate()


def test_only_each_blocks_input_is_kept_for_backward():
    """What frees the memory: with checkpointing, a forward pass saves far fewer tensors for backward."""
    model = GPT(PRESETS["tiny"])
    x = torch.randint(0, 256, (2, 64))
    saved = []
    for recompute in (False, True):
        model.checkpoint_blocks = recompute
        count = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _, loss = model(x, x)
        loss.backward()
        saved.append(count)
    assert saved[1] < saved[0] / 2, saved


@pytest.mark.parametrize(
    ("model", "pays"), [("nano", False), ("tiny", False), ("base", False), ("gpt2-small", True)]
)
def test_auto_recomputes_where_the_activations_outweigh_the_model(model, pays):
    config = PRESETS[model]
    with torch.device("meta"):  # the parameter count without allocating gpt2-small
        parameters = parameter_count(GPT(config))
    assert checkpointing_pays(config, parameters) is pays
    # A long context makes even a small model's one window big: auto turns it on there.
    assert checkpointing_pays(replace(config, block_size=65536), parameters)


def test_the_setting_is_checked():
    with pytest.raises(ConfigError, match="auto, on or off"):
        PeerConfig(run_id="r", activation_checkpointing="sometimes")
    assert PeerConfig(run_id="r").worker_dict()["activation_checkpointing"] == "auto"
