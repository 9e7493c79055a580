"""The control socket on a real daemon: `peer status` (--json, and at 80 columns), and every REPL command
through an 80-column pty."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.request

import pytest

from shoal.transport.identity import generate_key, peer_id_from_key

from .conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
PROMPT = b"shoal>"
QUIET_S = 0.5  # the prompt is back and nothing more arrives: the answer is complete
COLUMNS = 80


def overlong(text: str) -> list[str]:
    """Lines wider than the terminal; the join command may be (it is printed whole, to be copied)."""
    return [line for line in text.splitlines() if len(line) > COLUMNS and not line.startswith("peer join ")]


class Terminal:
    """A program on a pseudo-terminal, read until its prompt comes back."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = COLUMNS, rows: int = 50):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
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
    assert f'shoal_exchange_duration_seconds_count{{peer="{status["peer_id"]}",run="watch"}}' in metrics
    counters = re.findall(r"^# TYPE (\S+) counter$", metrics, re.MULTILINE)
    assert counters and all(name.endswith("_total") for name in counters), counters

    me = status["peer_id"]
    short = me.removeprefix("12D3KooW")[:8]  # alone in the run: 8 characters past 12D3KooW are unique
    join = f"peer join --run watch --bootstrap {status['address']}"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "COLUMNS": str(COLUMNS),
        "LINES": "50",
    }

    # One screen at 80 columns: short ids, nothing wider, the join command whole on its own line.
    out = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "status", "--state-dir", str(state_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not overlong(out.stdout), out.stdout
    assert join in out.stdout.splitlines() and f"Shoal peer {short}" in out.stdout
    assert out.stdout.count(me) == 1, out.stdout  # in the join command only
    wide = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "status", "--wide", "--state-dir", str(state_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert wide.returncode == 0 and f"Shoal peer {me}" in wide.stdout, wide.stdout

    terminal = Terminal(
        [sys.executable, "-P", "-m", "shoal.peer", "repl", "--state-dir", str(state_dir)], env
    )
    terminal.read_until_prompt(timeout=60)
    stranger = str(peer_id_from_key(generate_key()))  # a valid peer id, never a member
    expectations = [
        ("help", ["status", "links", "unban", "wide"]),
        ("status", ["eval loss", "peers known", f"Shoal peer {short}", join]),
        ("peers", [short]),
        ("links", ["nothing yet"]),  # alone in the run: no partner yet
        ("rounds 3", ["outcome"]),
        ("loss 5", ["eval"]),
        ("config", ["run_id", "watch"]),
        ("dht", ["routing_table_size"]),
        ("state", ["members", short]),
        ("why", ["training"]),  # alone in the run, it is always busy training
        ("log 5", ["INFO"]),
        ("ban nosuchpeer", ["error", "no member of this run has a peer id starting with 'nosuchpeer'"]),
        ("ban 12D3KooWpdeadbeef", ["error", "no member"]),
        (f"ban {short}", ["error", "own id"]),
        (f"ban {stranger}", [f"banned {stranger[8:16]}"]),  # any valid id: a peer not seen yet
        (f"unban {stranger[8:16]}", [f"unbanned {stranger[8:16]}"]),  # a prefix of a banned one
        (f"unban {stranger}", ["error", "not banned"]),  # the second time it fails
        ("wide", ["wide: on"]),
        ("peers", [me]),
        ("wide", ["wide: off"]),
        ("nonsense", ["unknown command"]),
    ]
    for line, wanted in expectations:
        answer = terminal.command(line)
        for text in wanted:
            assert text in answer, (line, text, answer[-1500:])
        if line != "peers" or me not in answer:  # `wide` lines may be as long as they need
            assert not overlong(answer), (line, overlong(answer))
            shown = answer.replace(join, "").replace(f"shoal> {line}", "")  # less the command typed
            assert me not in shown and stranger not in shown, (line, answer[-1500:])  # ids are short
    assert terminal.close() == 0
    log = peer.log_path.read_text()
    assert "control socket: ban nosuchpeer" in log and f"control socket: unban {stranger}" in log
    refused = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "status", "--state-dir", str(state_dir), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert json.loads(refused.stdout)["bans"] == []  # the refused bans recorded nothing
    assert peer.process.poll() is None  # the peer trained on through all of it
    assert (tmp_path / ".shoal_repl_history").read_text().count("status") >= 1
