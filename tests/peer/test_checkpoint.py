"""Checkpoints hold everything a resumed peer needs: stopping and resuming changes nothing, bit for bit."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from shoal.peer.worker.train import CheckpointError, Trainer, TrainSettings

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("textwrap.py", "difflib.py", "argparse.py"):
        shutil.copy(STDLIB / name, folder / name)
    return folder


def settings(data: Path, peer: str, method: str, model: str = "nano") -> TrainSettings:
    return TrainSettings(
        model=model, inner_steps=3, batch_size=4, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, method=method, data=str(data), rounds=None, shard=[0, 1],
        init_seed=7, data_seed=7 if peer == "a" else 8, peer_id=f"peer-{peer}",
    )  # fmt: skip


def run_rounds(a: Trainer, b: Trainer, rounds: int) -> None:
    """Two peers in lock step: every other round they swap, the others they train alone."""
    for _ in range(rounds):
        for trainer in (a, b):
            for _ in range(trainer.settings.inner_steps):
                trainer.train_step()
        own_a, own_b = a.message(), b.message()
        swap = a.round % 2 == 0
        assert a.outer_step(own_a, own_b if swap else None) in ("swapped", "alone")
        b.outer_step(own_b, own_a if swap else None)


@pytest.mark.parametrize("method", ["compressed-noloco", "noloco", "pair-sparseloco"])
def test_a_resumed_peer_continues_exactly_where_it_stopped(corpus, tmp_path, method):
    a, b = Trainer(settings(corpus, "a", method)), Trainer(settings(corpus, "b", method))
    run_rounds(a, b, 4)

    a2, b2 = Trainer(settings(corpus, "a", method)), Trainer(settings(corpus, "b", method))
    run_rounds(a2, b2, 2)
    a2.save(tmp_path / "checkpoint.pt")
    resumed = Trainer(settings(corpus, "a", method))
    resumed.load(tmp_path / "checkpoint.pt")
    assert (resumed.round, resumed.inner_step) == (2, 6)
    run_rounds(resumed, b2, 2)

    for name in a.outer.slow:
        assert torch.equal(a.outer.slow[name], resumed.outer.slow[name]), name
        assert torch.equal(a.outer.momentum[name], resumed.outer.momentum[name]), name
        assert torch.equal(a.outer.error[name], resumed.outer.error[name]), name
    for p, q in zip(a.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.evaluate() == resumed.evaluate()


def test_a_partner_message_that_fails_validation_never_touches_the_weights(corpus):
    a = Trainer(settings(corpus, "a", "compressed-noloco"))
    alone = Trainer(settings(corpus, "a", "compressed-noloco"))
    for trainer in (a, alone):
        trainer.train_step()
    own, own_alone = a.message(), alone.message()
    outcome = a.outer_step(own, b"\x93garbage")
    assert outcome.startswith("partner message refused by the worker")
    alone.outer_step(own_alone, None)
    for name in a.outer.slow:
        assert torch.equal(a.outer.slow[name], alone.outer.slow[name])  # as if no partner had answered


def test_a_checkpoint_of_another_model_is_refused(corpus, tmp_path):
    Trainer(settings(corpus, "a", "noloco", "nano")).save(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="nano"):
        Trainer(settings(corpus, "a", "noloco", "tiny")).load(tmp_path / "checkpoint.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Trainer(settings(corpus, "a", "noloco")).load(tmp_path / "broken.pt")
