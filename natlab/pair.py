"""Drive lab agents: one public relay/STUN peer and two peers behind chosen NATs, connected and measured.

Used by `tests/natlab` and `bench/natlab.py`. Each agent is a real process in its own namespace, so the
packets cross real veths, bridges and nftables NAT; this module only reads and writes JSON lines.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from natlab.lab import LAB, PUBLIC_IP, PUBLIC_IP_2, LabError, NatLab

RELAY_PORT = 4001
STUN_PORT = 3478
TURN_PORT = 3479
# Start-up of an agent: Python import plus, behind a NAT, a reachability check (its dial-backs time out
# after 3 s on a NAT that filters) and a reservation.
AGENT_START_TIMEOUT_S = 30.0
# connect: direct dials, a relayed dial, a punch; each has its own deadline well inside this.
CONNECT_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 120.0


class Agent:
    """One `natlab/agent.py` process: send a command, read its one-line answer."""

    def __init__(self, lab: NatLab, ns: str, args: list[str], name: str, *, wait: bool = True) -> None:
        self.name = name
        self.lab = lab
        self._buffer = b""
        self.ready: dict[str, Any] = {}
        self.proc = lab.spawn_python(
            ns,
            [str(LAB / "agent.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> Agent:
        self.ready = self.read(AGENT_START_TIMEOUT_S)
        if self.ready.get("event") != "ready":
            raise LabError(f"agent {self.name} did not start: {self.ready}")
        return self

    def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"agent {self.name} answered nothing in {timeout_s} s{self._stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise LabError(f"agent {self.name} exited ({self.proc.wait()}){self._stderr()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return ": " + self.proc.stderr.read().decode(errors="replace")[-2000:]

    @property
    def peer(self) -> str:
        return str(self.ready["peer"])

    @property
    def addrs(self) -> list[str]:
        return list(self.ready["addrs"])


@dataclass
class PairResult:
    a: str
    b: str
    connected: bool
    path: str | None
    connect_s: float | None
    mb_s: float | None
    rtt_s: float | None = None
    reason: str = ""
    reachability: tuple[str, str] = ("", "")
    upgraded_later: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "connected": self.connected,
            "path": self.path,
            "connect_s": self.connect_s,
            "mb_s": self.mb_s,
            "rtt_s": self.rtt_s,
            "reason": self.reason,
            "reachability": list(self.reachability),
            "upgraded_later": self.upgraded_later,
        }


def start_relay(lab: NatLab) -> Agent:
    return Agent(
        lab,
        lab.pub_ns,
        [
            "--listen",
            f"/ip4/{PUBLIC_IP}/tcp/{RELAY_PORT}",
            "--serve-stun",
            str(STUN_PORT),
            "--serve-relay",
        ],
        "relay",
    )


def start_private(
    lab: NatLab,
    index: int,
    relay: Agent,
    *,
    punch: bool = True,
    wait: bool = True,
    methods: str = "tcp,ice",
    turn: str | None = None,
) -> Agent:
    relay_addr = f"/ip4/{PUBLIC_IP}/tcp/{RELAY_PORT}/p2p/{relay.peer}"
    # Two STUN addresses (one responder on both): a symmetric NAT shows itself by two different ports.
    args = [
        "--relay",
        relay_addr,
        "--stun",
        f"{PUBLIC_IP}:{STUN_PORT}",
        "--stun",
        f"{PUBLIC_IP_2}:{STUN_PORT}",
    ]
    if not punch:
        args.append("--no-punch")
    args += ["--punch-methods", methods]
    if turn:
        args += ["--turn", turn]
    return Agent(lab, lab.sites[index].host_ns, args, f"site{index}", wait=wait)


def run_pair(
    lab: NatLab,
    relay: Agent,
    transfer_bytes: int,
    methods: str = "tcp,ice",
    *,
    retry_upgrade: bool = True,
    turn: str | None = None,
) -> PairResult:
    """Peers behind sites 0 and 1 of `lab`: site 0 connects to site 1 and sends `transfer_bytes`.

    With `retry_upgrade`, a pair still relayed after connecting gets one more punch, as the daemon's
    maintenance would give it a minute later (port prediction misses about one time in fifty)."""
    a_type, b_type = lab.sites[0].nat_type, lab.sites[1].nat_type
    a = start_private(lab, 0, relay, wait=False, methods=methods, turn=turn)
    b = start_private(lab, 1, relay, wait=False, methods=methods, turn=turn)
    try:
        a.wait_ready()  # both start at once: their reachability checks overlap
        b.wait_ready()
        reach = (str(a.ready["reachability"]), str(b.ready["reachability"]))
        answer = a.call({"cmd": "connect", "peer": b.peer, "addrs": b.addrs}, CONNECT_TIMEOUT_S)
        if answer.get("event") != "connected":
            return PairResult(
                a_type, b_type, False, None, None, None, reason=str(answer.get("error")), reachability=reach
            )
        upgraded_later = False
        if retry_upgrade and answer.get("path") == "relay":
            later = a.call({"cmd": "upgrade", "peer": b.peer}, CONNECT_TIMEOUT_S)
            if later.get("event") == "connected" and later.get("path") not in (None, "relay"):
                answer = {**answer, "path": later["path"], "reason": later.get("reason", "")}
                upgraded_later = True
        mb_s = None
        if transfer_bytes:
            sent = a.call({"cmd": "send", "peer": b.peer, "bytes": transfer_bytes}, SEND_TIMEOUT_S)
            if sent.get("event") != "sent":
                raise LabError(f"transfer over {answer['path']} failed: {sent}")
            mb_s = sent["mb_s"]
        return PairResult(
            a_type,
            b_type,
            True,
            answer["path"],
            answer["connect_s"],
            mb_s,
            rtt_s=answer.get("rtt_s"),
            reason=answer.get("reason", ""),
            reachability=reach,
            upgraded_later=upgraded_later,
        )
    finally:
        for agent in (a, b):
            with_quit(agent)


def with_quit(agent: Agent) -> None:
    try:
        if agent.proc.poll() is None and agent.proc.stdin is not None:
            agent.proc.stdin.write(b'{"cmd": "quit"}\n')
            agent.proc.stdin.flush()
            agent.proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    agent.lab.stop(agent.proc)
