"""The compose swarm for real: a private Docker engine, the images, a public bootstrap (relay and STUN),
two public peers, one peer behind each NAT router (endpoint-independent and symmetric) and coturn. The
peers must train; the run must see every peer; NATed peers must reach the public side through their
router, which maps the way its kind says, know they are behind a NAT and hold a relay slot; no container
may reach the host (the engine is a stock one, with no firewall rule of ours); coturn must
answer STUN and grant TURN relays behind both NATs; NATed peers must swap with public peers and with each
other (the printed summary says over which path: relayed, punched or direct); one stopped peer must not
stop the rest; and the teardown must leave no container, network, link, firewall rule, mount or engine
process.

Part of `make test`; it skips only where no engine can be started (not root, no dockerd, or dockerd
fails to start). Slow the first time: docker/images.sh builds the base image and the images (about
two minutes from nothing; `.ci/run` does that before the tests) and keeps them in SHOAL_DOCKER_WORK;
with the images there the test takes about two minutes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
WORK = Path(os.environ.get("SHOAL_DOCKER_WORK", "/var/lib/shoal-docker"))
PROJECT = "shoaltest"
BASE_IMAGE = "shoal/base:bookworm"
PUBLIC_PEERS = 2  # `--scale peer=2`, beside the bootstrap
SETUP_TIMEOUT = 900  # seconds for a first build from nothing (debootstrap, torch into the image)
TRAIN_TIMEOUT = 300  # seconds for every peer to finish its first rounds on a loaded 2-core machine
ROUNDS_BEFORE = 2  # rounds every peer must report before one peer is stopped
ROUNDS_AFTER = 2  # further rounds every remaining peer must report after it
LOST_TIMEOUT = 60  # seconds for a remaining peer to report a stopped one lost (fail_after is 5 s)
SWAP_AGAIN_TIMEOUT = 90  # seconds for every remaining peer to swap again after the stop
SWARM_ENV = {
    "SHOAL_BASE_IMAGE": BASE_IMAGE,
    "SHOAL_RUN": "compose-test",
    "SHOAL_MODEL": "nano",
    "SHOAL_INNER_STEPS": "4",
    "SHOAL_BATCH_SIZE": "4",
    "SHOAL_THREADS": "1",
    "SHOAL_EXCHANGE_TIMEOUT": "20",  # a relayed dial may take 10 s
}


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the compose swarm needs root (it starts a private Docker engine)"
    for tool in ("dockerd", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io; .ci/run does)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
    pytest.mark.timeout(SETUP_TIMEOUT + 3 * TRAIN_TIMEOUT),
]


def _sh(*args: str, env: dict | None = None, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def _engine_processes() -> list[str]:
    """Processes whose command line names our engine's work dir: dockerd, its containerd, shims."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if str(WORK) in argv:
                found.append(f"{proc.name} {argv.strip()}")
    return found


def _host_state() -> dict[str, object]:
    """What an engine may leave behind on the host: firewall rules, links, forwarding, mounts, processes."""
    rules = _sh("iptables-save", check=False).splitlines() if shutil.which("iptables-save") else []
    tables = _sh("nft", "list", "tables", check=False).splitlines() if shutil.which("nft") else []
    return {
        "iptables": [re.sub(r"\[\d+:\d+\]", "", line) for line in rules if not line.startswith("#")],
        "nft_tables": sorted(tables),
        "links": sorted(
            line.split(":")[1].strip().split("@")[0] for line in _sh("ip", "-o", "link", "show").splitlines()
        ),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "mounts": [line for line in Path("/proc/mounts").read_text().splitlines() if str(WORK) in line],
        "engine_processes": _engine_processes(),
    }


class Swarm:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.compose = [
            str(WORK / "bin" / "docker-compose"),
            "-p",
            PROJECT,
            "-f",
            str(DOCKER / "compose.yaml"),
        ]

    def run(self, *args: str, timeout: float = 300) -> str:
        return _sh(*self.compose, *args, env=self.env, timeout=timeout)

    def containers(self) -> dict[str, str]:
        """Container name -> service, for this project's containers (running or not)."""
        out = _sh(
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={PROJECT}",
            "--format",
            '{{.Names}} {{.Label "com.docker.compose.service"}}',
            env=self.env,
        )
        return dict(line.split() for line in out.splitlines() if line.strip())

    def log_lines(self, container: str) -> list[str]:
        """The daemon's log (its stderr), which `events` does not read."""
        result = subprocess.run(
            ["docker", "logs", container], capture_output=True, text=True, env={**os.environ, **self.env}
        )
        return result.stderr.splitlines()

    def events(self, container: str) -> list[dict]:
        out = _sh("docker", "logs", container, env=self.env, check=False)
        events = []
        for line in out.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events


PROBE_PORT = 4800  # a throwaway listener in the bootstrap container, beside the peer's 4701
PROBE_SOURCE_PORT = 40001  # NATed peers dial from this port; EIM keeps it, symmetric replaces it
# argv: how many connections, port
OBSERVER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[2])))
server.settimeout(60)
for _ in range(int(sys.argv[1])):
    connection, (host, port) = server.accept()
    print(host, port, connection.recv(64).decode(), flush=True)
    connection.close()
"""
# argv: target host, target port, source port, a name to send
DIALER = """
import socket, sys, time
for attempt in range(30):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        s.sendall(sys.argv[4].encode())
        break
    except OSError:  # the listener may not be up yet
        s.close()
        time.sleep(0.5)
"""


# argv: the TURN server's address; prints "TYPE HOST PORT" for every ICE candidate gathered through it
GATHER = """
import asyncio, sys
import aioice
async def main():
    connection = aioice.Connection(
        ice_controlling=True, stun_server=(sys.argv[1], 3478), turn_server=(sys.argv[1], 3478),
        turn_username="shoal", turn_password="shoal-swarm", use_ipv6=False,
    )
    await asyncio.wait_for(connection.gather_candidates(), 30)
    for candidate in connection.local_candidates:
        print(candidate.type, candidate.host, candidate.port)
    await connection.close()
asyncio.run(main())
"""


# argv: addresses; prints those that answer a TCP connection to port 9 at all (accepted or refused)
ANSWERING = """
import errno, selectors, socket, sys, time
selector, answered = selectors.DefaultSelector(), []
for host in sys.argv[1:]:
    s = socket.socket()
    s.setblocking(False)
    if s.connect_ex((host, 9)) in (0, errno.ECONNREFUSED):
        answered.append(host)
    else:
        selector.register(s, selectors.EVENT_WRITE, host)
deadline = time.monotonic() + 3
while selector.get_map() and time.monotonic() < deadline:
    for key, _ in selector.select(deadline - time.monotonic()):
        if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (0, errno.ECONNREFUSED):
            answered.append(key.data)
        selector.unregister(key.fileobj)
print(" ".join(answered))
"""


def _host_addresses() -> list[str]:
    """The host's own IPv4 addresses (docker0's included), loopback aside."""
    out = _sh("ip", "-4", "-o", "addr", "show", "scope", "global")
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()})


def _host_answers(swarm: Swarm, containers: list[str]) -> dict[str, str]:
    """For each container, the host addresses it reaches (none, if the swarm leads nowhere)."""
    env = {**os.environ, **swarm.env}
    probes = {
        c: subprocess.Popen(
            ["docker", "exec", c, "python3", "-c", ANSWERING, *_host_addresses()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in containers
    }
    answers = {}
    for container, probe in probes.items():
        out, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, (container, err)
        answers[container] = out.strip()
    return answers


def _address_on(swarm: Swarm, container: str, network: str) -> str:
    template = '{{(index .NetworkSettings.Networks "' + f"{PROJECT}_{network}" + '").IPAddress}}'
    return _sh("docker", "inspect", "--format", template, container, env=swarm.env).strip()


def _observed_sources(swarm: Swarm, observer: str, dialers: list[str]) -> dict[str, tuple[str, int]]:
    """Each dialer connects from PROBE_SOURCE_PORT to a listener in `observer`; returns the source
    address the listener saw for each: what the dialer's NAT mapped it to."""
    target = _address_on(swarm, observer, "public")
    env = {**os.environ, **swarm.env}
    listener = subprocess.Popen(
        ["docker", "exec", observer, "python3", "-c", OBSERVER, str(len(dialers)), str(PROBE_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for dialer in dialers:
            args = (target, str(PROBE_PORT), str(PROBE_SOURCE_PORT), dialer)
            _sh("docker", "exec", dialer, "python3", "-c", DIALER, *args, env=swarm.env, timeout=60)
        out, err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    seen = {}
    for line in out.splitlines():
        host, port, name = line.split()
        seen[name] = (host, int(port))
    assert set(seen) == set(dialers), f"listener saw {out!r} {err!r}"
    return seen


# argv: a control command (`peer status`, the REPL's `links`); prints its answer as JSON
CONTROL = """
import asyncio, json, sys
from pathlib import Path
from shoal.peer.control import ControlClient
async def main():
    client = await ControlClient.connect(Path("/var/lib/shoal/state/control.sock"))
    try:
        print(json.dumps(await client.call(sys.argv[1])))
    finally:
        await client.close()
asyncio.run(main())
"""
PATHS = {"direct", "tcp-punch", "ice", "relay"}  # what the NAT layer names a path


def _control(swarm: Swarm, container: str, command: str) -> object:
    """One control-socket command inside a peer's container, as the peer's user (the socket is 0600)."""
    out = _sh(
        "docker", "exec", "--user", "shoal", container, "python3", "-c", CONTROL, command, env=swarm.env
    )
    return json.loads(out)


def _name_ids(line: str, role: dict[str, str]) -> str:
    """A log line with peer ids (whole, or the last 8 characters of `short()`) replaced by services."""
    for peer, service in role.items():
        line = line.replace(peer, service).replace(peer[-8:], service)
    return line[line.find("path to") :]


def _rounds(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "round"]


def _swapped_since(swarm: Swarm, container: str, rounds_before: int) -> bool:
    return any(r["outcome"] == "swapped" for r in _rounds(swarm.events(container))[rounds_before:])


def _wait_for(condition, timeout: float, what: str, swarm: Swarm) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(3)
    logs = {
        c: _sh("docker", "logs", "--tail", "15", c, env=swarm.env, check=False) for c in swarm.containers()
    }
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what}; last log lines: {json.dumps(logs, indent=1)}"
    )


def test_compose_swarm_with_nat_routers_trains_and_tears_down_cleanly():
    started = time.monotonic()
    _sh(str(DOCKER / "engine.sh"), "stop", timeout=120)  # a leftover engine of ours would skew the baseline
    before = _host_state()
    start = subprocess.run(
        [str(DOCKER / "engine.sh"), "start"], capture_output=True, text=True, timeout=SETUP_TIMEOUT
    )
    if start.returncode != 0:
        _sh(str(DOCKER / "engine.sh"), "stop", timeout=120)  # undo whatever half-start it made
        pytest.skip(f"no Docker engine could be started here: {start.stderr.strip()[-600:]}")
    engine_env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in start.stdout.splitlines()
        if line.startswith("export ")
    )
    env = {**engine_env, **SWARM_ENV}
    swarm = Swarm(env)
    try:
        # base image, wheels, images: each step skips what exists (.ci/run has built them all already)
        _sh(str(DOCKER / "images.sh"), env=env, timeout=SETUP_TIMEOUT)
        setup_seconds = time.monotonic() - started
        swarm.run("up", "--detach", "--no-build", "--scale", f"peer={PUBLIC_PEERS}")
        names = swarm.containers()
        peers = {c: s for c, s in names.items() if s in ("bootstrap", "peer", "peer-eim", "peer-sym")}
        assert sorted(Counter(peers.values()).items()) == [
            ("bootstrap", 1),
            ("peer", PUBLIC_PEERS),
            ("peer-eim", 1),
            ("peer-sym", 1),
        ]
        bootstrap = next(c for c, s in peers.items() if s == "bootstrap")

        def ids() -> dict[str, str]:
            found = {}
            for container in peers:
                listening = [e for e in swarm.events(container) if e.get("event") == "listening"]
                if listening:
                    found[container] = listening[0]["peer"]
            return found

        # every peer trains: rounds come out of each, the NATed ones included
        _wait_for(
            lambda: all(len(_rounds(swarm.events(c))) >= ROUNDS_BEFORE for c in peers),
            TRAIN_TIMEOUT,
            f"{ROUNDS_BEFORE} rounds from every peer",
            swarm,
        )
        peer_ids = ids()
        assert len(peer_ids) == len(peers)

        # the run sees every peer: each is a member in some other peer's view, NATed ones included
        def joined_at(container: str) -> set[str]:
            return {e["partner"] for e in swarm.events(container) if e.get("event") == "peer_joined"}

        known = set().union(*(joined_at(c) for c in peers))
        assert set(peer_ids.values()) <= known, (peer_ids, known)
        # The bootstrap itself missed two peers' `peer_joined` in two full-suite runs (never when this test
        # ran alone): printed, with its refusal lines, until that is explained (see the issue notes).
        unseen = {c: p for c, p in peer_ids.items() if c != bootstrap and p not in joined_at(bootstrap)}
        if unseen:
            refusals = [line for line in swarm.log_lines(bootstrap) if "refused" in line][-10:]
            print("compose swarm: the bootstrap has no peer_joined for", unseen, "refusals:", refusals)
        for container, service in peers.items():
            rounds = _rounds(swarm.events(container))
            assert all(r["train_loss"] is None or r["train_loss"] > 0 for r in rounds), container
            assert rounds[-1]["inner_step"] >= ROUNDS_BEFORE * int(SWARM_ENV["SHOAL_INNER_STEPS"]), service
        # nothing in the swarm reaches the host (nor, through it, anything else): no bridge of the
        # swarm's has a host address, and the private networks masquerade nothing
        assert _host_addresses(), "the host has no address to probe"
        reached = {c: a for c, a in _host_answers(swarm, sorted(names)).items() if a}
        assert not reached, f"containers reach the host: {reached}"
        # NATed peers' traffic really went through their routers' masquerade rules
        for router in (c for c, s in names.items() if s.startswith("router-")):
            table = _sh("docker", "exec", router, "nft", "list", "table", "ip", "shoal_nat", env=env)
            masquerade = next(line for line in table.splitlines() if "masquerade" in line)
            assert " packets 0 " not in masquerade, f"{router}: nothing was NATed: {masquerade}"
        # the routers map as their kind says: one keeps the source port, the other picks a random one
        mapped = _observed_sources(
            swarm, bootstrap, [c for c, s in peers.items() if s in ("peer-eim", "peer-sym")]
        )
        routers = {s: _address_on(swarm, c, "public") for c, s in names.items() if s.startswith("router-")}
        for container, (host, port) in mapped.items():
            kind = peers[container].removeprefix("peer-")
            assert host == routers[f"router-{kind}"], f"{container} reached the public side as {host}"
            assert (port == PROBE_SOURCE_PORT) == (kind == "eim"), (
                f"{kind} NAT mapped port {PROBE_SOURCE_PORT}->{port}"
            )
        # coturn answers STUN and grants TURN relays to peers behind either NAT
        turn = next(c for c, s in names.items() if s == "turn")
        turn_address = _address_on(swarm, turn, "public")
        for container, (host, _) in mapped.items():
            found = _sh(
                "docker", "exec", container, "python3", "-c", GATHER, turn_address, env=env, timeout=90
            )
            candidates = {tuple(line.split()[:2]) for line in found.splitlines()}
            assert ("srflx", host) in candidates, f"{container}: STUN saw no mapping to {host}: {found}"
            assert ("relay", turn_address) in candidates, f"{container}: no TURN relay: {found}"
        # NATed peers know they are behind a NAT, hold a slot on the bootstrap's relay and publish only
        # relayed addresses (their own are private)
        natted = {peers[c]: c for c in mapped}  # service -> container
        for container in natted.values():
            status = _control(swarm, container, "status")
            assert status["reachability"].startswith("behind a NAT"), (container, status["reachability"])
            assert status["relay_reservations"] >= 1, (container, status)
            assert status["addresses"], (container, status)
            assert all("/p2p-circuit" in a for a in status["addresses"]), (container, status)

        # NATed peers swap with public peers and with each other: whoever dials a NATed peer comes in
        # through the relay, which the NAT layer then replaces where it can. `links` names each path; it
        # is read while the peers train (a path whose connection went idle is forgotten), and the last
        # path seen for each pair is kept.
        name = {c: c.removeprefix(f"{PROJECT}-") if s == "peer" else s for c, s in peers.items()}
        role = {peer_ids[c]: name[c] for c in peers}  # peer id -> bootstrap, peer-1, peer-eim, ...
        public = {name[c] for c, s in peers.items() if s in ("bootstrap", "peer")}
        paths: dict[str, str] = {}  # "peer-eim->bootstrap" -> path

        def swapped_with(container: str) -> set[str]:
            rounds = _rounds(swarm.events(container))
            return {role.get(r["partner"], "?") for r in rounds if r["outcome"] == "swapped"}

        def natted_peers_swapped() -> bool:
            for container in peers:
                with contextlib.suppress(AssertionError, json.JSONDecodeError):
                    for link in _control(swarm, container, "links"):
                        if link["path"] != "not connected":
                            paths[f"{name[container]}->{role.get(link['partner'], '?')}"] = link["path"]
            return (
                all(swapped_with(c) & public for c in natted.values())
                and "peer-sym" in swapped_with(natted["peer-eim"])
                and {"peer-eim->peer-sym", "peer-sym->peer-eim"} <= set(paths)
            )

        _wait_for(
            natted_peers_swapped,
            TRAIN_TIMEOUT,
            "NATed peers swapping with public peers and with each other",
            swarm,
        )
        assert set(paths.values()) <= PATHS, paths
        for pair, path in paths.items():
            source, target = pair.split("->")
            if source in natted and target in public:  # it dials out through its router
                assert path == "direct", paths
        outcomes = {c: Counter(r["outcome"].split(":")[0] for r in _rounds(swarm.events(c))) for c in peers}
        swaps = {
            name[c]: dict(
                Counter(
                    role.get(r["partner"], "?") for r in _rounds(swarm.events(c)) if r["outcome"] == "swapped"
                )
            )
            for c in peers
        }
        path_changes = [
            f"{name[c]}: {_name_ids(line, role)}"
            for c in natted.values()
            for line in swarm.log_lines(c)
            if re.search(r"path to \S+: ", line)
        ]

        # one public peer goes; the others go on training and the run notices
        victim = next(c for c, s in sorted(peers.items()) if s == "peer")
        counts = {c: len(_rounds(swarm.events(c))) for c in peers if c != victim}
        _sh("docker", "stop", "--time", "20", victim, env=env)
        # A stopped peer saves and exits 0 inside its grace period (before: 137, killed at the grace's end).
        exit_code = _sh("docker", "inspect", "--format", "{{.State.ExitCode}}", victim, env=env).strip()
        assert exit_code == "0", (exit_code, swarm.log_lines(victim)[-20:])
        _wait_for(
            lambda: all(len(_rounds(swarm.events(c))) >= counts[c] + ROUNDS_AFTER for c in counts),
            TRAIN_TIMEOUT,
            f"{ROUNDS_AFTER} more rounds from every remaining peer",
            swarm,
        )
        # The run notices: a remaining peer says the victim is gone once its goodbye (or its silence for
        # fail_after) reaches that peer's membership loop, which may come after those rounds under load.
        _wait_for(
            lambda: any(
                e.get("event") == "peer_lost" and e.get("partner") == peer_ids[victim]
                for c in counts
                for e in swarm.events(c)
            ),
            LOST_TIMEOUT,
            f"a remaining peer to report {name[victim]} lost",
            swarm,
        )
        # ... and they still exchange: every remaining peer swaps again after the stop
        stalled = ""
        deadline = time.monotonic() + SWAP_AGAIN_TIMEOUT
        while time.monotonic() < deadline and not all(_swapped_since(swarm, c, counts[c]) for c in counts):
            time.sleep(3)
        if not all(_swapped_since(swarm, c, counts[c]) for c in counts):
            since = Counter(
                re.sub(r"\d+", "N", re.sub(r"12D3\w+", "PEER", r["outcome"]))
                for c in counts
                for r in _rounds(swarm.events(c))[counts[c] :]
            )
            # Reported after the teardown checks, so that a stall does not hide a leak too. (Until the round
            # clock, gossip/rounds/clock.py, the remaining peers' rounds could drift apart here for good.)
            stalled = f"remaining peers stopped swapping after {name[victim]} stopped: {dict(since)}"

        summary = {
            "setup_s": round(setup_seconds, 1),
            "total_s": round(time.monotonic() - started, 1),
            "outcomes": {name[c]: dict(v) for c, v in outcomes.items()},
            "swapped_with": swaps,
            "paths": dict(sorted(paths.items())),
            "path_changes": path_changes,
            "nat_mapping": {peers[c]: f"{PROBE_SOURCE_PORT}->{p}" for c, (_, p) in mapped.items()},
            "skips": Counter(
                re.sub(r"\d+", "N", re.sub(r"12D3\w+", "PEER", r["outcome"]))
                for c in peers
                for r in _rounds(swarm.events(c))
                if r["outcome"] != "swapped"
            ),
        }
        print("compose swarm:", json.dumps(summary))
        # Ctrl-C on `docker compose up` (or `compose stop`): every peer exits 0 within its grace period.
        swarm.run("stop", "--timeout", "20")
        codes = {
            name[c]: _sh("docker", "inspect", "--format", "{{.State.ExitCode}}", c, env=env).strip()
            for c in peers
        }
        assert set(codes.values()) == {"0"}, codes
    finally:
        try:
            swarm.run("down", "--volumes", "--remove-orphans", "--timeout", "20")
            assert swarm.containers() == {}
            networks = _sh(
                "docker",
                "network",
                "ls",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--quiet",
                env=env,
            )
            assert networks.strip() == ""
        finally:
            _sh(str(DOCKER / "engine.sh"), "stop", timeout=120)
    after = _host_state()
    assert after["engine_processes"] == [] and after["mounts"] == [], after
    assert after == before
    assert not stalled, stalled
