"""The partner guard inside the worker (issue 18): a peer judges its partner's message before it pulls
toward it. An honest partner is pulled toward; a hostile one (played with the test-only `behave`) is refused
and, refused again and again, excluded here; refusing leaves this peer's weights as if it had sat out the
round; what the guard remembers survives a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from shoal.gossip.outer.guard import ACCEPT, REFUSE
from shoal.peer.worker.train import Trainer, TrainSettings


def settings(data: Path, peer: str, behave: str | None = None) -> TrainSettings:
    return TrainSettings(
        model="nano", inner_steps=3, batch_size=4, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, method="compressed-noloco", data=str(data), rounds=None,
        shard=[0, 1], init_seed=7, data_seed={"a": 7, "b": 8}[peer], peer_id=f"peer-{peer}",
        behave=behave,
    )  # fmt: skip


def train_round(trainer: Trainer) -> bytes:
    while trainer.round_steps < trainer.settings.inner_steps:
        trainer.train_step()
    return trainer.message()


def swap(a: Trainer, b: Trainer) -> tuple[str, str]:
    """One round in which a and b swap what they send (a hostile one sends its attack)."""
    own_a, own_b = train_round(a), train_round(b)
    sent_a, sent_b = a.outgoing(own_a), b.outgoing(own_b)
    return a.outer_step(own_a, sent_b, b.settings.peer_id), b.outer_step(own_b, sent_a, a.settings.peer_id)


def test_honest_partners_pull_toward_each_other(corpus):
    a, b = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "b"))
    for _ in range(4):
        outcomes = swap(a, b)
        assert all(o == "swapped" or o.startswith("swapped, the partner's pull clipped") for o in outcomes)
        assert a.verdict is not None and a.verdict.action != REFUSE
        assert b.verdict is not None and b.verdict.action != REFUSE
    assert a.verdict.action == ACCEPT and {"ratio", "cos", "probe"} <= set(a.verdict.scores)
    assert not a.guard.excluded and not b.guard.excluded  # type: ignore[union-attr]


def test_a_hostile_partner_is_refused_then_excluded(corpus):
    hostile, honest = Trainer(settings(corpus, "a", "scale")), Trainer(settings(corpus, "b"))
    # The same peer, data and schedule, which never gets a partner: what a refusal must leave.
    alone = Trainer(settings(corpus, "b"))
    for round_ in range(3):
        _, outcome = swap(hostile, honest)
        own_alone = train_round(alone)
        alone.outer_step(own_alone, None)
        assert outcome.startswith("partner message refused"), outcome
        assert honest.verdict is not None and honest.verdict.action == REFUSE
        for name in honest.outer.slow:
            assert torch.equal(honest.outer.slow[name], alone.outer.slow[name]), (round_, name)
    assert "peer-a" in honest.guard.excluded  # type: ignore[operator]


def test_another_rounds_message_is_refused_without_a_strike(corpus):
    a, b = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "b"))
    own_a = train_round(a)
    train_round(b)
    b.round += 40  # b is 40 rounds further on: a's message of round 0 is not this round's
    outcome = b.outer_step(b.message(), own_a, "peer-a")
    assert outcome.startswith("partner message refused by the guard: round 0")
    assert not b.guard.strikes  # type: ignore[union-attr]


def test_what_the_guard_remembers_survives_a_checkpoint(corpus, tmp_path):
    hostile, honest = Trainer(settings(corpus, "a", "scale")), Trainer(settings(corpus, "b"))
    for _ in range(3):
        swap(hostile, honest)
    honest.save(tmp_path / "checkpoint.pt")
    resumed = Trainer(settings(corpus, "b"))
    resumed.load(tmp_path / "checkpoint.pt")
    assert resumed.guard is not None and honest.guard is not None
    assert resumed.guard.excluded == honest.guard.excluded
    assert resumed.guard.strikes == honest.guard.strikes
    assert dataclasses.asdict(resumed.guard.config) == dataclasses.asdict(honest.guard.config)
