"""A training run through real NAT routers: four `peer join` daemons, two on the lab's public network and
two behind NAT routers (port-restricted cone with symmetric, or two symmetric), train together.

The public bootstrap peer serves relaying and STUN, the other public peer relaying; the NATed peers
reserve a slot on both, publish only relayed addresses, and every peer reaches every other by the NAT
layer's path policy. Checked as a user would: every peer finishes its rounds, the NATed peers swap with
partners and their eval loss falls, `peer status` says they are behind a NAT, and `links` names the path
to each partner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from natlab.lab import PUBLIC_IP, PUBLIC_IP_2, NatLab, unavailable_reason
from shoal.peer.control import ControlClient, ControlError

pytestmark = [
    pytest.mark.slow,  # real processes in network namespaces
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ROUNDS = 4
PORT = 4701
STUN_PORT = 3478
RUN_TIMEOUT_S = 400  # four daemons and four torch workers share two cores
PATHS = {"direct", "tcp-punch", "ice", "relay"}


class LabPeer:
    """One `peer join` in a lab namespace, its JSON events collected from stdout by a thread."""

    def __init__(self, lab: NatLab, ns: str, name: str, args: list[str], state: Path):
        self.name, self.state = name, state
        self.log_path = state.parent / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by the lab's teardown of the process
        self.proc = lab.spawn_python(
            ns,
            ["-P", "-m", "shoal.peer", "join", "--json-events", "--state-dir", str(state), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                continue

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]

    def wait_for(self, kind: str, timeout_s: float, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.of_kind(kind)) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {count} {kind!r} events; log tail:\n{self.log_tail()}")
            time.sleep(0.1)
        return self.of_kind(kind)

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def control(self, command: str) -> object:
        """One control-socket command (`peer status`, the REPL's `links`): the socket is a file, reachable
        from outside the peer's network namespace."""

        async def call() -> object:
            client = await ControlClient.connect(self.state / "control.sock")
            try:
                return await client.call(command)
            finally:
                await client.close()

        return asyncio.run(call())


@pytest.mark.parametrize(
    "nat_types",
    [
        ("eim-apdf", "symmetric"),  # the two NATed peers punch a hole to each other
        ("symmetric", "symmetric"),  # no punch gets through two symmetric NATs: they swap through the relay
    ],
)
def test_four_peers_two_behind_nats_train_together(tmp_path, nat_types):
    config = tmp_path / "lab.toml"
    # Eight processes load torch on two cores at once: give silent members longer before they are dead.
    config.write_text("[peer]\nfail_after = 30.0\n")
    common = [
        "--config", str(config), "--run", "natlab", "--model", "nano", "--inner-steps", "4",
        "--batch-size", "4", "--threads", "1", "--rounds", str(ROUNDS), "--wait-peers", "4",
        "--exchange-timeout", "20",
    ]  # fmt: skip
    serving = ["--listen", f"/ip4/{PUBLIC_IP}/tcp/{PORT}", "--serve-relay", "--serve-stun", str(STUN_PORT)]
    stun = ["--stun", f"{PUBLIC_IP}:{STUN_PORT}", "--stun", f"{PUBLIC_IP_2}:{STUN_PORT}"]
    with NatLab(nat_types, public_hosts=1) as lab:
        boot = LabPeer(lab, lab.pub_ns, "boot", [*common, *serving], tmp_path / "boot")
        address = boot.wait_for("listening", 60)[0]["address"]
        assert address.startswith(f"/ip4/{PUBLIC_IP}/tcp/{PORT}/p2p/")
        joining = [*common, "--bootstrap", address]
        public_args = [*joining, "--listen", f"/ip4/{lab.public_host_ip(0)}/tcp/{PORT}", "--serve-relay"]
        public = LabPeer(lab, lab.public_host_ns(0), "public", public_args, tmp_path / "public")
        second_relay = public.wait_for("listening", 60)[0]["address"]
        # Two relays, one named without its /p2p/ id: the daemon learns it by connecting.
        relays = ["--relay", address.split("/p2p/")[0], "--relay", second_relay]
        natted_args = [*joining, "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", *relays, *stun]
        natted = [
            LabPeer(
                lab,
                site.host_ns,
                f"nat-{site.index}-{site.nat_type}",
                natted_args,
                tmp_path / f"nat-{site.index}",
            )
            for site in lab.sites
        ]
        peers = [boot, public, *natted]

        # While they train: a NATed peer knows it is behind a NAT and publishes relayed addresses only.
        for peer in natted:
            peer.wait_for("round", RUN_TIMEOUT_S)
            status = peer.control("status")
            assert status["reachability"].startswith("behind a NAT"), status["reachability"]
            assert status["addresses"] and all("/p2p-circuit" in a for a in status["addresses"]), status
            assert status["relay_reservations"] == 2
            assert peer.control("dht")["mode"].startswith("client")  # not in others' routing tables
            for relay in (address, second_relay):
                assert any(a.startswith(f"{relay}/p2p-circuit") for a in status["addresses"]), status
        assert boot.control("status")["reachability"].startswith("not checked")  # it has nobody to ask

        # `links` while they train (a peer's control socket goes when its last round is done).
        links: dict[str, list[dict]] = {}
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(p.proc.poll() is None for p in peers) and time.monotonic() < deadline:
            for peer in peers:
                if peer.proc.poll() is None and peer.of_kind("round"):
                    with contextlib.suppress(ControlError, OSError, TimeoutError):
                        links[peer.name] = peer.control("links")
            time.sleep(1.0)
        for peer in peers:
            peer.wait_for("done", 1)

        ids = {p.name: p.of_kind("listening")[0]["peer"] for p in peers}
        names = {v: k for k, v in ids.items()}
        summary = {}
        for peer in peers:
            rounds = peer.of_kind("round")
            swapped = [r for r in rounds if r["outcome"] == "swapped"]
            summary[peer.name] = {
                "rounds": [r["round"] for r in rounds],
                "joined_at_round": [e["round"] for e in peer.of_kind("weights")],
                "swapped_with": sorted(names.get(r["partner"], "?") for r in swapped),
                "skipped": [r["outcome"] for r in rounds if r["outcome"] != "swapped"],
                # A public peer may finish its rounds between two polls: only NATed peers' paths are checked.
                "paths": {names.get(link["partner"], "?"): link["path"] for link in links.get(peer.name, [])},
            }
        print(json.dumps(summary, indent=1))
        for peer in natted:
            assert peer.name in links, (peer.name, "its `links` never answered while it trained")
            assert summary[peer.name]["swapped_with"], (peer.name, summary, peer.log_tail())
            evals = [e["eval_loss"] for e in peer.of_kind("eval")]
            assert evals[-1] < evals[0], (peer.name, evals)
        # Every partner a peer swapped with was reached over a path the NAT layer named; a NATed peer
        # reaches a public one directly (it dials out through its NAT).
        for name, info in summary.items():
            assert set(info["paths"].values()) <= PATHS, (name, info)
            for partner, path in info["paths"].items():
                if name.startswith("nat-") and partner in ("boot", "public"):
                    assert path == "direct", (name, partner, path)
                elif name.startswith("nat-") and partner.startswith("nat-"):  # a punch is possible or not
                    assert (path == "relay") == (nat_types == ("symmetric", "symmetric")), (
                        name,
                        partner,
                        path,
                    )


def test_a_natted_peer_that_names_only_its_bootstrap_is_reached_through_it(tmp_path):
    """No --relay, no --stun: the peer learns it is behind a NAT from the bootstrap peer's dial-back,
    reserves a slot on it (it serves relaying), publishes the relayed address, and trains."""
    config = tmp_path / "lab.toml"
    config.write_text("[peer]\nfail_after = 30.0\n")
    rounds = 6  # three peers: one sits out each round; six rounds make a NATed peer that never swaps unlikely
    common = [
        "--config", str(config), "--run", "natlab-auto", "--model", "nano", "--inner-steps", "4",
        "--batch-size", "4", "--threads", "1", "--rounds", str(rounds), "--wait-peers", "3",
        "--exchange-timeout", "20",
    ]  # fmt: skip
    with NatLab(("eim-apdf",), public_hosts=1) as lab:
        boot_args = [*common, "--listen", f"/ip4/{PUBLIC_IP}/tcp/{PORT}", "--serve-relay"]
        boot = LabPeer(lab, lab.pub_ns, "boot", boot_args, tmp_path / "boot")
        address = boot.wait_for("listening", 60)[0]["address"]
        joining = [*common, "--bootstrap", address]
        public_args = [*joining, "--listen", f"/ip4/{lab.public_host_ip(0)}/tcp/{PORT}"]
        public = LabPeer(lab, lab.public_host_ns(0), "public", public_args, tmp_path / "public")
        natted_args = [*joining, "--listen", f"/ip4/0.0.0.0/tcp/{PORT}"]
        natted = LabPeer(lab, lab.sites[0].host_ns, "nat", natted_args, tmp_path / "nat")

        natted.wait_for("round", RUN_TIMEOUT_S)
        status = natted.control("status")
        assert status["reachability"].startswith("behind a NAT"), status["reachability"]
        assert status["relay_reservations"] == 1
        assert status["addresses"] == [f"{address}/p2p-circuit/p2p/{status['peer_id']}"], status["addresses"]
        for peer in (boot, public, natted):
            peer.wait_for("done", RUN_TIMEOUT_S)
        swapped = [r for r in natted.of_kind("round") if r["outcome"] == "swapped"]
        assert swapped, natted.of_kind("round")
        evals = [e["eval_loss"] for e in natted.of_kind("eval")]
        assert evals[-1] < evals[0], evals
