"""A real training worker, driven over its control channel as the daemon drives it: it checkpoints every
round and keeps the previous checkpoint, saves mid-round when asked to stop (by the daemon or by SIGTERM)
and exits 0, and resumes from the previous checkpoint (or starts fresh) when the latest is damaged, saying
so in one line and without a traceback. Stop-to-exit times are measured by bench/stop_latency.py."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch

from shoal.peer.worker.checkpoints import previous_of
from shoal.peer.worker.train import Trainer, TrainSettings
from shoal.transport.messages import LENGTH_PREFIX, decode_body, encode_message

pytestmark = pytest.mark.slow  # real worker processes (each loads torch)

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LONG_ROUND = 1_000_000  # inner steps: a round that is always under way when the stop comes


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("textwrap.py", "difflib.py"):
        shutil.copy(STDLIB / name, folder / name)
    return folder


def settings(corpus: Path, **changes: Any) -> dict[str, Any]:
    values = dict(
        model="nano", inner_steps=2, batch_size=4, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=8, seed=0, threads=1, method="default", data=str(corpus), rounds=None, shard=[0, 1],
        init_seed=7, data_seed=7, peer_id="peer-a",
    )  # fmt: skip
    values.update(changes)
    return values


class Worker:
    """`python -m shoal.peer.worker` with the daemon's side of the control channel; stderr to a file."""

    def __init__(self, folder: Path, values: dict[str, Any]):
        self.checkpoint = folder / "checkpoint.pt"
        self.stderr_path = folder / f"worker-{len(list(folder.glob('worker-*.log')))}.log"
        folder.mkdir(exist_ok=True)
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "shoal.peer.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
            )
        self.send({"type": "start", "settings": values, "checkpoint": str(self.checkpoint)})

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(encode_message(message))
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        prefix = self.process.stdout.read(LENGTH_PREFIX.size)
        assert len(prefix) == LENGTH_PREFIX.size, f"the worker closed its channel:\n{self.stderr()}"
        (length,) = LENGTH_PREFIX.unpack(prefix)
        return decode_body(self.process.stdout.read(length), 1 << 16)

    def expect(self, kind: str) -> dict[str, Any]:
        """The next message of `kind`; the daemon's replies to rounds on the way (no partner: skip)."""
        while (message := self.receive())["type"] != kind:
            assert message["type"] != "error", message
            if message["type"] == "payload":
                self.send({"type": "skip", "round": message["round"], "reason": "no partner in this test"})
        return message

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self) -> int:
        return self.process.wait(timeout=120)


def saved(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_worker_checkpoints_every_round_and_keeps_the_previous_one(corpus, tmp_path):
    worker = Worker(tmp_path / "state", settings(corpus, rounds=3))
    assert worker.expect("hello")["round"] == 0
    worker.send({"type": "begin", "weights_nbytes": 0})
    assert worker.expect("done")["round"] == 3
    assert worker.wait() == 0, worker.stderr()
    assert saved(worker.checkpoint)["round"] == 3
    assert saved(previous_of(worker.checkpoint))["round"] == 2  # written after round 2, not only at the end
    assert "Traceback" not in worker.stderr()


@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_a_stop_in_mid_round_keeps_the_inner_steps_done_and_exits_0(corpus, tmp_path, how):
    worker = Worker(tmp_path / "state", settings(corpus, inner_steps=LONG_ROUND))
    worker.expect("hello")
    worker.send({"type": "begin", "weights_nbytes": 0})
    worker.expect("progress")  # a second into the first round's inner steps
    if how == "stop":
        worker.send({"type": "stop"})
    else:  # systemd and Docker signal every process of the service, the worker too
        worker.process.send_signal(signal.SIGTERM)
    assert worker.expect("done")["round"] == 0
    assert worker.wait() == 0, worker.stderr()
    state = saved(worker.checkpoint)
    assert state["round"] == 0  # the last round finished: the outer state's
    assert 0 < state["round_steps"] == state["inner_step"]
    assert "Traceback" not in worker.stderr()

    # Resumed, it goes on with that round's inner steps, not a fresh round.
    again = Worker(tmp_path / "state", settings(corpus, inner_steps=LONG_ROUND))
    hello = again.expect("hello")
    assert (hello["round"], hello["inner_step"]) == (0, state["inner_step"])
    again.send({"type": "begin", "weights_nbytes": 0})
    again.expect("progress")
    again.send({"type": "stop"})
    again.expect("done")
    assert again.wait() == 0, again.stderr()
    later = saved(again.checkpoint)
    assert later["round_steps"] == later["inner_step"] > state["inner_step"]
    assert saved(previous_of(again.checkpoint))["inner_step"] == state["inner_step"]


def write_two_checkpoints(corpus: Path, path: Path) -> None:
    """Round 1 as the previous checkpoint, round 2 as the latest."""
    trainer = Trainer(TrainSettings.from_dict(settings(corpus)))
    for _ in range(2):
        while trainer.round_steps < trainer.settings.inner_steps:
            trainer.train_step()
        trainer.outer_step(trainer.message(), None)
        trainer.save(path)


def checkpoint_lines(worker: Worker) -> list[str]:
    return [line for line in worker.stderr().splitlines() if "checkpoint" in line]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
    path = tmp_path / "state" / "checkpoint.pt"
    write_two_checkpoints(corpus, path)
    path.write_bytes(path.read_bytes()[:1000])
    worker = Worker(tmp_path / "state", settings(corpus))
    assert worker.expect("hello")["round"] == 1
    worker.process.stdin.close()  # the daemon stops before the first round
    assert worker.wait() == 0
    (line,) = checkpoint_lines(worker)
    assert "damaged" in line and "resumed from the previous checkpoint" in line, line
    assert "Traceback" not in worker.stderr()
    assert (path.parent / "checkpoint.pt.rejected").exists()


def test_an_empty_checkpoint_with_no_previous_one_starts_fresh(corpus, tmp_path):
    path = tmp_path / "state" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    worker = Worker(tmp_path / "state", settings(corpus, rounds=1))
    assert worker.expect("hello")["round"] == 0
    worker.send({"type": "begin", "weights_nbytes": 0})
    assert worker.expect("done")["round"] == 1
    assert worker.wait() == 0
    (line,) = checkpoint_lines(worker)
    assert "empty file" in line and "starting fresh" in line, line
    assert "Traceback" not in worker.stderr()
    assert saved(path)["round"] == 1
