"""The worker's round loop (peer/worker/process.py) when its daemon dies right after a swap: the round the
worker just finished is saved, and φ is left as a snapshot file for joiners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shoal.gossip.rounds import payload as dense
from shoal.peer.ipc import SharedBuffer
from shoal.peer.worker import overlap, process
from shoal.peer.worker.checkpoints import CheckpointWriter, resume
from shoal.peer.worker.memory import PHASE_PEAKS_ENV, PhasePeaks
from shoal.peer.worker.process import _train
from shoal.peer.worker.snapshots import snapshot_path
from shoal.peer.worker.train import Trainer

from .test_worker_guard import settings, train_round


class DaemonKilledAfterTheSwap:
    """The control channel as the daemon drives one swapped round, after which the daemon is gone
    (SIGKILL): every later send finds the pipe broken."""

    def __init__(self, nbytes: int, partner: str) -> None:
        self.reply = {"type": "partner", "round": 1, "nbytes": nbytes, "peer": partner}
        self.gone = False
        self.sent: list[dict] = []

    def send(self, message: dict) -> None:
        if self.gone:
            raise BrokenPipeError("the daemon is gone")
        self.sent.append(message)

    def receive(self) -> dict:
        self.gone = True
        return self.reply

    def stop_requested(self) -> bool:
        return False


def test_a_round_finished_as_the_daemon_dies_is_saved(corpus, tmp_path):
    worker, partner = Trainer(settings(corpus, "a")), Trainer(settings(corpus, "b"))
    capacity = dense.max_payload_bytes(worker.spec())
    outbound, inbound = SharedBuffer.create(capacity), SharedBuffer.create(capacity)
    path = tmp_path / "checkpoint.pt"
    writer = CheckpointWriter(path)
    try:
        nbytes = inbound.write(partner.outgoing(train_round(partner)))
        channel = DaemonKilledAfterTheSwap(nbytes, partner.settings.peer_id)
        with pytest.raises(BrokenPipeError):  # its first send after the outer step: the guard's verdict
            _train(channel, worker, outbound, inbound, writer)  # type: ignore[arg-type]
        assert [m["type"] for m in channel.sent] == ["payload"]
    finally:
        writer.close()  # as run() does on its way out: the background write finishes
        outbound.close()
        inbound.close()
    resumed = Trainer(settings(corpus, "a"))
    resume(resumed, path)
    assert resumed.round == 1  # not 0: the swapped round was not lost with the daemon
    assert not snapshot_path(tmp_path, 1).exists()  # nobody was told of one: none was written


def train_rounds(worker: Trainer, partner: Trainer, tmp_path: Path, daemon: Callable[[int, str], Any]) -> Any:
    """Runs the worker's round loop to its last round against `daemon(nbytes, partner id)`, which answers
    every round with the partner's message of one trained round; returns that daemon."""
    capacity = dense.max_payload_bytes(worker.spec())
    outbound, inbound = SharedBuffer.create(capacity), SharedBuffer.create(capacity)
    writer = CheckpointWriter(tmp_path / "checkpoint.pt")
    try:
        channel = daemon(inbound.write(partner.outgoing(train_round(partner))), partner.settings.peer_id)
        assert process._train(channel, worker, outbound, inbound, writer) == 0
    finally:
        writer.close()
        outbound.close()
        inbound.close()
    return channel


class DaemonForRounds:
    """The control channel as the daemon drives `rounds` swapped rounds with the same partner message."""

    def __init__(self, nbytes: int, partner: str, rounds: int) -> None:
        self.nbytes, self.partner, self.rounds = nbytes, partner, rounds
        self.sent: list[dict] = []
        self.answered = 0

    def send(self, message: dict) -> None:
        self.sent.append(message)

    def receive(self) -> dict:
        self.answered += 1
        return {"type": "partner", "round": self.answered, "nbytes": self.nbytes, "peer": self.partner}

    def stop_requested(self) -> bool:
        return False


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("asked", [True, False])
def test_each_rounds_evaluation_reports_the_peak_memory_of_its_phases_when_asked(
    corpus, tmp_path, monkeypatch, asked
):
    # Benchmarks ask for each phase's peak (the worker then resets its VmHWM as a phase begins); a peer
    # run by a user keeps its VmHWM whole for its monitoring and reports none.
    if asked:
        monkeypatch.setenv(PHASE_PEAKS_ENV, "1")
    else:
        monkeypatch.delenv(PHASE_PEAKS_ENV, raising=False)
    monkeypatch.setattr(process, "PEAKS", PhasePeaks())
    worker = Trainer(replace(settings(corpus, "a"), rounds=2))
    channel = train_rounds(
        worker, Trainer(settings(corpus, "b")), tmp_path, lambda n, p: DaemonForRounds(n, p, 2)
    )
    evals = [m for m in channel.sent if m["type"] == "eval"]
    assert [m["round"] for m in evals] == [1, 2]
    for message in evals:
        if not asked:
            assert "peak_mb" not in message
            continue
        peaks = message["peak_mb"]
        assert set(peaks) == {"inner", "message", "wait", "outer", "snapshot", "eval"}
        assert all(isinstance(mb, int) and mb > 0 for mb in peaks.values())


class DaemonOnASlowLink(DaemonForRounds):
    """DaemonForRounds whose answers say how long the round's swap took (`swap_seconds`); the
    answer of an overlapped round is there when the worker next waits for one."""

    def __init__(self, nbytes: int, partner: str, rounds: int, swap_seconds: float | None) -> None:
        super().__init__(nbytes, partner, rounds)
        self.swap_seconds = swap_seconds
        self.expecting_answer = False

    def receive(self) -> dict:
        return {**super().receive(), "swap_seconds": self.swap_seconds}

    def answer_ready(self) -> bool:
        return False


@pytest.mark.parametrize("swap_seconds", [600.0, 0.01, None])
def test_by_default_rounds_overlap_only_while_the_swap_takes_a_large_share_of_a_round(
    corpus, tmp_path, monkeypatch, swap_seconds
):
    monkeypatch.setattr(overlap, "AUTO_MIN_BYTES", 0)  # this test's model is far smaller than any that counts
    worker = Trainer(replace(settings(corpus, "a"), rounds=3, overlap="auto"))
    partner = Trainer(settings(corpus, "b"))
    channel = train_rounds(worker, partner, tmp_path, lambda n, p: DaemonOnASlowLink(n, p, 3, swap_seconds))
    overlapped = [m["round"] for m in channel.sent if m["type"] == "eval" and "overlapped_steps" in m]
    # Round 1 has nothing measured yet, and the last round has no next round to train meanwhile.
    assert overlapped == ([2] if swap_seconds == 600.0 else [])
    assert worker.round == 3
