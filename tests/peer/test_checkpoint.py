"""Checkpoints hold everything a resumed peer needs: stopping and resuming changes nothing, bit for bit,
also in the middle of a round; each write keeps the one before it, and a checkpoint that cannot be used is
set aside for the previous one (or a fresh start) with one log line. The worker processes that write them
are in test_worker_restarts.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from shoal.peer.worker.checkpoints import CheckpointWriter, previous_of, resume
from shoal.peer.worker.train import CheckpointError, Interrupted, Trainer, TrainSettings


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
            while trainer.round_steps < trainer.settings.inner_steps:  # the rest, after a mid-round stop
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
    assert a.outer.error.keys() == resumed.outer.error.keys()  # empty for the dense methods: no EF buffer
    for name in a.outer.error:
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


def test_a_peer_stopped_in_mid_round_takes_only_the_rest_of_that_round(corpus, tmp_path):
    method = "compressed-noloco"
    a, b = Trainer(settings(corpus, "a", method)), Trainer(settings(corpus, "b", method))
    run_rounds(a, b, 3)

    a2, b2 = Trainer(settings(corpus, "a", method)), Trainer(settings(corpus, "b", method))
    run_rounds(a2, b2, 1)
    a2.train_step()
    a2.train_step()  # stopped after 2 of round 2's 3 inner steps
    a2.save(tmp_path / "checkpoint.pt")
    resumed = Trainer(settings(corpus, "a", method))
    resumed.load(tmp_path / "checkpoint.pt")
    assert (resumed.round, resumed.inner_step, resumed.round_steps) == (1, 5, 2)
    run_rounds(resumed, b2, 2)

    assert resumed.inner_step == a.inner_step == 9
    for p, q in zip(a.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in a.outer.slow:
        assert torch.equal(a.outer.slow[name], resumed.outer.slow[name]), name


def test_every_write_keeps_the_one_before_it_and_no_thread_outlives_the_writer(corpus, tmp_path):
    trainer = Trainer(settings(corpus, "a", "noloco"))
    path = tmp_path / "checkpoint.pt"
    writer = CheckpointWriter(path)
    for _ in range(3):
        while trainer.round_steps < trainer.settings.inner_steps:
            trainer.train_step()
        trainer.outer_step(trainer.message(), None)
        writer.write(trainer.state_dict())  # in the background
    writer.close()
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]
    assert torch.load(path, weights_only=True)["round"] == 3
    assert torch.load(previous_of(path), weights_only=True)["round"] == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.pt", "checkpoint.pt.prev"]


def test_the_state_written_in_the_background_is_a_copy_that_training_does_not_touch(corpus):
    trainer = Trainer(settings(corpus, "a", "noloco"))
    trainer.train_step()
    state = trainer.state_dict()
    moments = {k: v["exp_avg"].clone() for k, v in state["optimizer"]["state"].items()}
    fast = [t.clone() for t in state["fast"]]
    trainer.train_step()
    for key, moment in moments.items():
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg"], moment)
    for before, saved in zip(fast, state["fast"], strict=True):
        assert torch.equal(before, saved)


def round_with_optimizer_file(trainer: Trainer, writer: CheckpointWriter) -> None:
    """One round as the worker's loop runs it: the optimizer's state written while the daemon would swap,
    then the round's checkpoint naming that file, in the background while the next round trains."""
    while trainer.round_steps < trainer.settings.inner_steps:
        trainer.train_step()
    own = trainer.message()
    name = writer.write_optimizer(trainer.optimizer.state_dict())
    trainer.outer_step(own, None)
    writer.write(trainer.state_dict(name))


def test_the_optimizer_goes_to_a_file_of_its_own_and_a_resume_from_it_continues_exactly(corpus, tmp_path):
    path = tmp_path / "checkpoint.pt"
    twin = Trainer(settings(corpus, "a", "noloco"))
    trainer = Trainer(settings(corpus, "a", "noloco"))
    writer, twin_writer = CheckpointWriter(path), CheckpointWriter(tmp_path / "twin" / "checkpoint.pt")
    for _ in range(5):
        round_with_optimizer_file(trainer, writer)
        round_with_optimizer_file(twin, twin_writer)
    writer.close()
    twin_writer.close()
    saved = torch.load(path, weights_only=True)
    assert saved["optimizer"] is None  # no copy of the moments in the round's checkpoint
    files = sorted(p.name for p in tmp_path.glob("optimizer-*.pt"))
    assert saved["optimizer_file"] in files and len(files) == 3  # older ones removed
    # Train on past the checkpoint (the moments change in place), then resume from it: the file holds the
    # moments as they were at the round's end, so the resumed peer matches its uninterrupted twin.
    trainer.train_step()
    resumed = Trainer(settings(corpus, "a", "noloco"))
    resume(resumed, path)
    assert resumed.round == 5
    for peer in (resumed, twin):
        while peer.round_steps < peer.settings.inner_steps:
            peer.train_step()
    for p, q in zip(twin.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_whose_optimizer_file_is_gone_falls_back_to_the_previous_one(corpus, tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    trainer = Trainer(settings(corpus, "a", "noloco"))
    writer = CheckpointWriter(path)
    for _ in range(2):
        round_with_optimizer_file(trainer, writer)
    writer.close()
    (tmp_path / torch.load(path, weights_only=True)["optimizer_file"]).unlink()
    resumed = Trainer(settings(corpus, "a", "noloco"))
    with caplog.at_level(logging.INFO):
        resume(resumed, path)
    (line,) = worker_lines(caplog)
    assert "is missing" in line.message
    assert "previous checkpoint, checkpoint.pt.prev, at round 1" in line.message
    assert resumed.round == 1


def two_checkpoints(corpus: Path, path: Path, model: str = "nano") -> Trainer:
    """`path` at round 2 and its previous one at round 1."""
    trainer = Trainer(settings(corpus, "a", "noloco", model))
    for _ in range(2):
        while trainer.round_steps < trainer.settings.inner_steps:
            trainer.train_step()
        trainer.outer_step(trainer.message(), None)
        trainer.save(path)
    return trainer


def worker_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shoal.peer.worker"]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_in_one_line(corpus, tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    two_checkpoints(corpus, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = Trainer(settings(corpus, "a", "noloco"))
    with caplog.at_level(logging.INFO):
        resume(trainer, path)
    (line,) = worker_lines(caplog)
    assert line.levelno == logging.WARNING and not line.exc_info
    assert "damaged" in line.message and "previous checkpoint, checkpoint.pt.prev, at round 1" in line.message
    assert trainer.round == 1
    assert not path.exists() and (tmp_path / "checkpoint.pt.rejected").exists()  # set aside, not deleted
    trainer.save(path)  # the checkpoint it resumed from stays the previous one
    assert torch.load(previous_of(path), weights_only=True)["round"] == 1


@pytest.mark.parametrize("damage", ["empty", "another model", "not a checkpoint"])
def test_an_unusable_checkpoint_without_a_previous_one_starts_fresh(corpus, tmp_path, caplog, damage):
    path = tmp_path / "checkpoint.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "another model":
        Trainer(settings(corpus, "a", "noloco", "tiny")).save(path)
    else:
        torch.save([1, 2, 3], path)
    trainer = Trainer(settings(corpus, "a", "noloco"))
    fresh = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.INFO):
        resume(trainer, path)
    (line,) = worker_lines(caplog)
    assert "starting fresh" in line.message and str(path) in line.message, line.message
    assert {"empty": "empty file", "another model": "'tiny'"}.get(damage, "damaged") in line.message
    assert trainer.round == 0 and trainer.inner_step == 0
    assert all(torch.equal(p, q) for p, q in zip(fresh, trainer.model.parameters(), strict=True))
    assert (tmp_path / "checkpoint.pt.rejected").exists()


def test_a_load_that_fails_half_way_leaves_the_trainer_as_it_was(corpus, tmp_path):
    path = tmp_path / "checkpoint.pt"
    source = two_checkpoints(corpus, path)
    state = source.state_dict()
    state["optimizer"] = {"state": {}, "param_groups": []}  # fails after the fast weights were taken
    torch.save(state, path)
    trainer = Trainer(settings(corpus, "a", "noloco"))
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(CheckpointError, match="damaged"):
        trainer.load(path)
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters(), strict=True))
    assert (trainer.round, trainer.inner_step, trainer.round_steps) == (0, 1, 1)


@pytest.mark.parametrize("polls", [1, 8, 20])  # nano has 15 leaf modules: forward, then backward
def test_a_stop_inside_an_inner_step_drops_that_step_whole(corpus, polls):
    """A stop request is seen as the model runs (not only between steps): the step under way never happened,
    so the worker saves the state before it, and its resumed self draws the same batch again."""
    stopped, straight = Trainer(settings(corpus, "a", "noloco")), Trainer(settings(corpus, "a", "noloco"))
    for trainer in (stopped, straight):
        trainer.train_step()
    calls = 0

    def stop_after_some_polls() -> bool:
        nonlocal calls
        calls += 1
        return calls >= polls

    stopped.should_stop = stop_after_some_polls
    with pytest.raises(Interrupted):
        stopped.train_step()
    with pytest.raises(Interrupted):
        stopped.evaluate()
    stopped.should_stop = None
    assert (stopped.inner_step, stopped.round_steps) == (1, 1)
    for trainer in (stopped, straight):
        trainer.train_step()
    for p, q in zip(stopped.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert stopped.evaluate() == straight.evaluate()


def test_a_checkpoint_that_does_not_fit_on_the_disk_says_so_and_leaves_the_last_one(tmp_path):
    # A file-size limit stands in for a full disk: torch.save's write fails part way (it raises a
    # RuntimeError of its own, which the worker used to report as a bug in Shoal).
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from pathlib import Path
        from shoal.peer.worker.checkpoints import CheckpointError, write_checkpoint
        path = Path({str(tmp_path / "checkpoint.pt")!r})
        write_checkpoint(path, {{"w": torch.zeros(1000)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            write_checkpoint(path, {{"w": torch.ones(1 << 20)}})
        except CheckpointError as error:
            print("CheckpointError:", error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "CheckpointError: cannot write the checkpoint" in done.stdout, done.stdout + done.stderr
    assert "free some disk space" in done.stdout
    assert torch.load(tmp_path / "checkpoint.pt")["w"].shape == (1000,)  # the last whole one stays
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no partial file left behind
