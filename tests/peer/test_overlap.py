"""Overlapped rounds (`peer join --overlap`): the next round trains while the swap runs, and once the answer
is in, φ is exactly what it would have been without overlap; a stop before the answer ends the round as one
without a partner; the worker's control channel holds the answer that arrives while it trains."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from shoal.peer.ipc import ControlChannel
from shoal.peer.worker import overlap
from shoal.peer.worker.train import Trainer, TrainSettings
from shoal.transport.messages import MessageError, encode_message


def settings(data: Path, peer: str) -> TrainSettings:
    return TrainSettings(
        model="nano", inner_steps=3, batch_size=4, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, method="default", data=str(data), rounds=None, shard=[0, 1],
        init_seed=7, data_seed=7 if peer == "a" else 8, peer_id=f"peer-{peer}", overlap="on",
    )  # fmt: skip


def train_round(*trainers: Trainer) -> None:
    for trainer in trainers:
        while trainer.round_steps < trainer.settings.inner_steps:
            trainer.train_step()


@pytest.mark.parametrize("spilled", [False, True, "unwritable"], ids=["in-memory", "spilled", "unwritable"])
def test_an_overlapped_round_settles_to_exactly_the_slow_weights_of_a_round_without_overlap(
    corpus, tmp_path, spilled
):
    plain_a, plain_b = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "b"))
    over_a, over_b = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "b"))
    train_round(plain_a, plain_b, over_a, over_b)
    own_a, own_b = over_a.message(), over_b.message()
    assert own_a == plain_a.message() and own_b == plain_b.message()  # twins: the same round so far
    expected = plain_a.outer_step(own_a, own_b, "peer-b")
    plain_b.outer_step(own_b, own_a, "peer-a")

    (tmp_path / "state").mkdir()
    spill = tmp_path / "state" / overlap.SPILL_NAME if spilled else None
    if spilled == "unwritable":  # the file cannot be written (a full disk, here a missing folder)
        spill = tmp_path / "no-such-folder" / overlap.SPILL_NAME
    pending = overlap.begin(over_a, own_a, None, spill)
    overlap.begin(over_b, own_b, None)
    if spilled == "unwritable":  # the round's state stays in memory
        assert pending.spill is None and len(pending.fast) == len(over_a.names)
    elif spilled:
        # While the next round trains, the old outer state and this round's fast weights are on disk only.
        assert spill is not None and spill.stat().st_size >= 3 * 4 * over_a.parameter_count()
        assert pending.fast == {} and pending.saved[: len(overlap.SPILLED)] == (None,) * len(overlap.SPILLED)
    alone = [t.clone() for t in over_a.slow]
    assert not all(torch.equal(x, y) for x, y in zip(alone, plain_a.slow, strict=True))  # φ' is not φ
    over_a.train_step()  # the next round trains while the swap runs
    over_a.train_step()
    trained = [p.detach().clone() for p in over_a.model.parameters()]

    assert overlap.settle(over_a, pending, 1, own_b, "peer-b") == expected
    assert not any((tmp_path / "state").iterdir())  # the spill file went once read
    # φ and the outer momentum are those of the round without overlap, bit for bit; so is the guard's verdict.
    assert over_a.round == plain_a.round == 1
    for name in over_a.names:
        assert torch.equal(over_a.outer.slow[name], plain_a.outer.slow[name])
        assert torch.equal(over_a.outer.momentum[name], plain_a.outer.momentum[name])
    assert over_a.verdict is not None and plain_a.verdict is not None
    assert (over_a.verdict.action, over_a.verdict.weight) == (plain_a.verdict.action, plain_a.verdict.weight)
    # The fast weights trained meanwhile moved by φ − φ': the partner's part of the step, one round late.
    for p, before, new, old in zip(over_a.model.parameters(), trained, over_a.slow, alone, strict=True):
        assert torch.allclose(p.detach(), before + (new - old), atol=1e-7)
    assert over_a.round_steps == 2  # the round under way goes on

    # The settled round's checkpoint is that of a round's start: φ as fast weights, no inner step of the next.
    state = overlap.round_start_state(over_a, pending)
    assert state["round"] == 1 and state["round_steps"] == 0 and state["inner_step"] == 3
    assert all(torch.equal(f, s) for f, s in zip(state["fast"], plain_a.slow, strict=True))


def test_a_skipped_round_keeps_the_step_taken_alone(corpus):
    plain, over = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "a"))
    train_round(plain, over)
    own = over.message()
    plain.outer_step(plain.message(), None)
    pending = overlap.begin(over, own, None)
    over.train_step()
    assert overlap.settle(over, pending, 1, None, None) == "alone"
    assert all(torch.equal(x, y) for x, y in zip(over.slow, plain.slow, strict=True)) and over.round == 1


def test_a_stop_before_the_answer_ends_the_round_without_a_partner_and_drops_the_next_rounds_steps(corpus):
    plain, over = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "a"))
    train_round(plain, over)
    plain.outer_step(plain.message(), None)  # what a stop during the swap does without overlap
    pending = overlap.begin(over, over.message(), None)
    over.train_step()
    over.train_step()
    overlap.abandon(over, pending)
    assert (over.round, over.round_steps, over.inner_step) == (plain.round, 0, plain.inner_step)
    # The state a checkpoint now holds is the plain peer's: the same weights, and the same next batch (the
    # inner optimizer's moments are the round's file, `pending.optimizer_file`, not the ones in memory).
    for p, q in zip(plain.model.parameters(), over.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(torch.equal(x, y) for x, y in zip(over.slow, plain.slow, strict=True))
    assert plain.train_step() == over.train_step()  # the same loss: the same weights on the same batch


def channel_pair() -> tuple[ControlChannel, object]:
    read_end, write_end = os.pipe()
    return ControlChannel(os.fdopen(read_end, "rb", buffering=0), open(os.devnull, "wb")), os.fdopen(
        write_end, "wb", buffering=0
    )


def test_the_swaps_answer_arriving_while_the_worker_trains_is_held_for_it():
    channel, daemon = channel_pair()
    channel.expecting_answer = True
    daemon.write(encode_message({"type": "partner", "round": 1, "nbytes": 10, "peer": "p"}))  # type: ignore[attr-defined]
    assert channel.stop_requested() is False and channel.answer_ready()
    daemon.write(encode_message({"type": "stop"}))  # type: ignore[attr-defined]
    assert channel.stop_requested() is True  # a stop after the answer still stops
    assert channel.receive() == {"type": "partner", "round": 1, "nbytes": 10, "peer": "p"}
    assert channel.stop_requested() is True  # and stays seen


def test_an_answer_nobody_waits_for_breaks_the_protocol():
    channel, daemon = channel_pair()
    daemon.write(encode_message({"type": "partner", "round": 1, "nbytes": 10}))  # type: ignore[attr-defined]
    with pytest.raises(MessageError, match="while the worker was training"):
        channel.stop_requested()


def test_the_overlap_policy_follows_the_link_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="shoal.peer.worker")
    assert overlap.Policy("on").next_round() and not overlap.Policy("off").next_round()
    policy = overlap.Policy("auto")
    assert not policy.next_round()  # nothing measured yet
    big = overlap.AUTO_MIN_BYTES
    policy.note_training(20.0, full_round=True)
    policy.note_answer({"type": "partner", "nbytes": big, "swap_seconds": 4.0})  # under a quarter
    assert not policy.next_round()
    policy.note_answer({"type": "partner", "nbytes": big - 1, "swap_seconds": 6.0})  # too small to tell
    assert not policy.next_round()
    policy.note_answer({"type": "partner", "nbytes": big, "swap_seconds": 6.0})
    assert policy.next_round()
    policy.note_answer({"type": "skip", "reason": "no partner"})  # nothing new about the link
    policy.note_training(2.0, full_round=False)  # a round resumed mid-way says nothing of a round's length
    assert policy.next_round()
    policy.note_training(3.6, full_round=True)
    policy.note_answer({"type": "partner", "nbytes": big, "swap_seconds": 0.9})  # a quarter, but under 1 s
    assert not policy.next_round()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("overlapping rounds: a swap takes 6.0 s") for line in lines)
    assert any(line.startswith("no longer overlapping rounds") for line in lines)
    with pytest.raises(ValueError, match="overlap must be one of"):
        overlap.Policy("sometimes")
