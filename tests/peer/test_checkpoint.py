"""Checkpoints hold everything a resumed peer needs: stopping and resuming changes nothing, bit for bit."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.worker.train import CheckpointError, Trainer, TrainSettings

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("textwrap.py", "difflib.py", "argparse.py"):
        shutil.copy(STDLIB / name, folder / name)
    return folder


def settings(data: Path, model: str = "nano") -> TrainSettings:
    return TrainSettings(
        model=model, inner_steps=3, batch_size=4, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, outer_momentum=0.5, outer_lr=0.7, data=str(data), rounds=None,
        shard=[0, 1], init_seed=7, peer_id="peer-a",
    )  # fmt: skip


def run_rounds(trainer: Trainer, rounds: int, partner: np.ndarray) -> None:
    for _ in range(rounds):
        for _ in range(trainer.settings.inner_steps):
            trainer.train_step()
        trainer.outer_step(partner if trainer.round % 2 else None)  # swapped and skipped rounds alike


def test_a_resumed_peer_continues_exactly_where_it_stopped(corpus, tmp_path):
    partner = Trainer(settings(corpus)).fast_vector() * 0.5  # a fixed "partner" payload
    straight = Trainer(settings(corpus))
    run_rounds(straight, 4, partner)

    first = Trainer(settings(corpus))
    run_rounds(first, 2, partner)
    first.save(tmp_path / "checkpoint.pt")
    resumed = Trainer(settings(corpus))
    resumed.load(tmp_path / "checkpoint.pt")
    assert (resumed.round, resumed.inner_step) == (2, 6)
    run_rounds(resumed, 2, partner)

    for a, b in zip(straight.slow, resumed.slow, strict=True):
        assert torch.equal(a, b)
    assert np.array_equal(straight.fast_vector(), resumed.fast_vector())
    for a, b in zip(straight.momentum, resumed.momentum, strict=True):
        assert torch.equal(a, b)
    assert straight.evaluate() == resumed.evaluate()


def test_a_checkpoint_of_another_model_is_refused(corpus, tmp_path):
    Trainer(settings(corpus, "nano")).save(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="nano"):
        Trainer(settings(corpus, "tiny")).load(tmp_path / "checkpoint.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Trainer(settings(corpus)).load(tmp_path / "broken.pt")
