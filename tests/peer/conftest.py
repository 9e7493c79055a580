"""Real `peer join` processes for end-to-end tests: started, followed through their JSON events, stopped."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small corpus folder: three modules of the standard library."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("textwrap.py", "difflib.py", "argparse.py"):
        shutil.copy(STDLIB / name, folder / name)
    return folder


class PeerProcess:
    def __init__(self, args: list[str], log_path: Path):
        env = dict(os.environ)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "shoal.peer", "join", "--json-events", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=REPO,
        )
        self.events: list[dict] = []
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        """The first event (seen before or arriving within `timeout`) that satisfies `predicate`."""
        for event in list(self.events):
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if event is None:
                break
            if predicate(event):
                return event
        raise AssertionError(f"no matching event within {timeout}s; log tail:\n{self.log_tail()}")

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        self._log.close()


@pytest.fixture
def start_peer(tmp_path):
    started: list[PeerProcess] = []

    def start(name: str, *args: str, log: str | None = None) -> PeerProcess:
        """A peer with state directory `name` (a restart: the same name again), logging to `log` or `name`."""
        peer = PeerProcess([*args, "--state-dir", str(tmp_path / name)], tmp_path / f"{log or name}.log")
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()
