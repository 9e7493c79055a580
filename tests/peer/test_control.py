"""The control socket on a real daemon: `peer status --json`, and every REPL command through a pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
PROMPT = b"shoal>"
QUIET_S = 0.5  # the prompt is back and nothing more arrives: the answer is complete


class Terminal:
    """A program on a pseudo-terminal, read until its prompt comes back."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO)
        os.close(slave)
        self.screen = b""

    def read_until_prompt(self, timeout: float = 30.0) -> str:
        deadline, seen = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], QUIET_S)
            if not ready:
                if PROMPT in seen:
                    self.screen += seen
                    return ANSI.sub(b"", seen).decode(errors="replace")
                continue
            try:
                seen += os.read(self.master, 65536)
            except OSError:
                break
        raise AssertionError(f"no prompt within {timeout}s; got: {ANSI.sub(b'', seen)[-2000:]!r}")

    def command(self, line: str) -> str:
        os.write(self.master, line.encode() + b"\r")
        return self.read_until_prompt()

    def close(self) -> int:
        os.write(self.master, b"quit\r")
        code = self.process.wait(timeout=15)
        os.close(self.master)
        return code


def test_status_and_every_repl_command_answer_while_the_peer_trains(start_peer, tmp_path):
    args = "--run watch --listen 127.0.0.1:0 --rounds 1000 --inner-steps 4 --threads 1 --metrics 127.0.0.1:0"
    peer = start_peer("watched", *args.split())
    peer.wait_for(lambda e: e["event"] == "round", timeout=120)
    state_dir = tmp_path / "watched"
    out = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "status", "--state-dir", str(state_dir), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    for key in (
        "peer_id",
        "address",
        "reachability",
        "run",
        "round",
        "inner_step",
        "inner_steps_per_s",
        "train_loss",
        "eval_loss",
        "partner",
        "path",
        "bytes_sent_per_round",
        "bytes_received_per_round",
        "bits_per_param",
        "peers_known",
        "peers_live",
        "bans",
        "last_error",
        "why",
    ):
        assert key in status, key
    assert status["peer_id"] == peer.of_kind("listening")[0]["peer"]
    assert status["run"] == "watch" and status["round"] >= 1 and status["peers_live"] == 1
    assert status["why"].endswith(".")
    # It started the run: nobody to ask whether it can be dialed, and it says so.
    assert status["reachability"].startswith("not checked"), status["reachability"]
    assert status["addresses"] == [status["address"]]
    assert (state_dir / "control.sock").stat().st_mode & 0o777 == 0o600

    # The same figures for Prometheus.
    port = re.search(r"metrics at http://127.0.0.1:(\d+)/metrics", peer.log_path.read_text())[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert f'shoal_eval_loss{{peer="{status["peer_id"]}",run="watch"}}' in metrics
    assert "# TYPE shoal_rounds_total counter" in metrics

    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "COLUMNS": "160",
        "LINES": "50",
    }
    terminal = Terminal(
        [sys.executable, "-P", "-m", "shoal.peer", "repl", "--state-dir", str(state_dir)], env
    )
    terminal.read_until_prompt(timeout=60)
    me = peer.of_kind("listening")[0]["peer"]
    expectations = [
        ("help", ["status", "links", "unban"]),
        ("status", ["eval loss", "peers known", me[:12]]),
        ("peers", [me[:12]]),
        ("links", ["nothing yet"]),  # alone in the run: no partner yet
        ("rounds 3", ["outcome"]),
        ("loss 5", ["eval_loss"]),
        ("config", ["run_id", "watch"]),
        ("dht", ["routing_table_size"]),
        ("state", ["members"]),
        ("why", ["training"]),  # alone in the run, it is always busy training
        ("log 5", ["INFO"]),
        ("ban pdeadbeef", ["banned pdeadbeef"]),
        ("unban pdeadbeef", ["unbanned pdeadbeef"]),
        ("unban pdeadbeef", ["error", "not banned"]),  # the second time it fails
        ("nonsense", ["unknown command"]),
    ]
    for line, wanted in expectations:
        answer = terminal.command(line)
        for text in wanted:
            assert text in answer, (line, text, answer[-1500:])
    assert terminal.close() == 0
    log = peer.log_path.read_text()
    assert "control socket: ban pdeadbeef" in log and "control socket: unban pdeadbeef" in log
    assert peer.process.poll() is None  # the peer trained on through all of it
    assert (tmp_path / ".shoal_repl_history").read_text().count("status") >= 1
