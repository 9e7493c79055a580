"""The worker's round loop (peer/worker/process.py) when its daemon dies right after a swap: the round the
worker just finished is saved, and φ is left as a snapshot file for joiners."""

from __future__ import annotations

import pytest

from shoal.gossip.rounds import payload as dense
from shoal.peer.ipc import SharedBuffer
from shoal.peer.worker.checkpoints import CheckpointWriter, resume
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
