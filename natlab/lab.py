"""The NAT lab: a fake internet in Linux network namespaces, with private networks behind NAT routers.

Layout (one lab; every name carries a per-process prefix so parallel labs never collide):

    <p>-pub     bridge br0 with 203.0.113.1 (and .2): public peers, STUN responders, coturn run here.
                A dead-end veth is its default route, so packets for private addresses vanish silently
                instead of failing with "Network is unreachable" (coturn drops whole allocations on that).
    <p>-r<i>    NAT router i: `wan` 203.0.113.<11+i> on the bridge, `lan` 10.0.<i+1>.1, nftables NAT.
    <p>-h<i>    private host i: 10.0.<i+1>.2, default route through router i.
    <p>-p<j>    public host j (`public_hosts`): 203.0.113.<21+j> on the bridge, a machine of its own on the
                internet (two public peers in <p>-pub would talk over loopback and misjudge each other).

NAT types (RFC 4787 terms), each made with nftables on the router:

    eim-eif     endpoint-independent mapping and filtering ("full cone"): masquerade keeps the source
                port, and every inbound packet for the router's address is forwarded (DNAT) to the host.
    eim-apdf    endpoint-independent mapping, address-and-port-dependent filtering (port-restricted cone):
                plain masquerade; only replies to flows the host opened come in.
    symmetric   endpoint-dependent mapping: masquerade fully-random picks a new port per destination.

Unsolicited inbound packets are dropped, never answered with RST or ICMP, as home routers do: an RST
would kill a TCP simultaneous open (py-libp2p's hole punching failed exactly so; docs/design.md).

Nothing leaves the lab: the namespaces have no link to the host's network. The kernel here has no
netem, so links can be rate-limited (`tc tbf`) but not delayed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError

log = logging.getLogger(__name__)

NAT_TYPES = ("eim-eif", "eim-apdf", "symmetric")
PUBLIC_IP = "203.0.113.1"
# A second public address on the same bridge: a STUN server on it sees a symmetric NAT's other mapping.
PUBLIC_IP_2 = "203.0.113.2"
PUBLIC_PREFIX = 24
# Processes get this long to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
# Commands that build the lab are local kernel calls; one that takes longer is stuck.
COMMAND_TIMEOUT_S = 20.0
# coturn listens beside Shoal's own STUN responder (3478), with a lab-only user.
TURN_PORT = 3479
TURN_USER, TURN_PASSWORD = "lab", "labpass"
REPO_ROOT = Path(__file__).resolve().parents[1]
LAB = Path(__file__).resolve().parent
TOOLS = ("ip", "nft", "tc")


class LabError(ShoalError):
    """The NAT lab could not be built or driven."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (for pytest.skip), or None when it can."""
    if sys.platform != "linux":
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the NAT lab needs {', '.join(missing)}: apt-get install -y iproute2 nftables"
    return _probe_namespaces()


@functools.cache
def _probe_namespaces() -> str | None:
    """Root is not enough in some containers (no CAP_SYS_ADMIN, no nf_tables): try once, for real."""
    name = f"nlprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        nft = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            input="table ip probe {}\n",
            capture_output=True,
            text=True,
        )
        if nft.returncode != 0:
            return f"nftables does not work in a namespace here: {nft.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class Site:
    """One private network: a host behind a NAT router."""

    index: int
    nat_type: str
    router_ns: str
    host_ns: str

    @property
    def wan_ip(self) -> str:
        return f"203.0.113.{11 + self.index}"

    @property
    def host_ip(self) -> str:
        return f"10.0.{self.index + 1}.2"

    @property
    def gateway_ip(self) -> str:
        return f"10.0.{self.index + 1}.1"


def nat_ruleset(nat_type: str, wan_ip: str, host_ip: str) -> str:
    """The router's whole nftables ruleset for one NAT type."""
    if nat_type not in NAT_TYPES:
        raise LabError(f"unknown NAT type {nat_type!r}; choose one of {', '.join(NAT_TYPES)}")
    masquerade = "masquerade fully-random" if nat_type == "symmetric" else "masquerade"
    full_cone = nat_type == "eim-eif"
    dnat = f'iifname "wan" ip daddr {wan_ip} dnat to {host_ip}' if full_cone else ""
    forward_in = 'iifname "wan" ct status dnat accept' if full_cone else ""
    return f"""
flush ruleset
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
}}
table ip filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "lan" oifname "wan" accept
        ct state established,related accept
        {forward_in}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        iifname "lan" accept
        ct state established,related accept
    }}
}}
"""


@dataclass
class NatLab:
    """Builds the lab on `up()` and removes every namespace and process it made on `down()`."""

    nat_types: Sequence[str]
    # One-way delay on each router's uplink (a `labdelay` process per site): two private peers see an
    # RTT of 4x this, a private peer and the relay 2x.
    delay_ms: float = 0.0
    public_hosts: int = 0
    prefix: str = field(default_factory=lambda: f"nl{os.getpid() % 100000}")
    sites: list[Site] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def pub_ns(self) -> str:
        return f"{self.prefix}-pub"

    def public_host_ns(self, index: int) -> str:
        return f"{self.prefix}-p{index}"

    @staticmethod
    def public_host_ip(index: int) -> str:
        return f"203.0.113.{21 + index}"

    # ------------------------------------------------------------------ build and tear down

    def __enter__(self) -> NatLab:
        self.up()
        return self

    def __exit__(self, *_: object) -> None:
        self.down()

    def up(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise LabError(reason)
        self.down()  # idempotent: a lab left by a crashed run with our prefix goes first
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        pub = self.pub_ns
        self._add_ns(pub)
        self._ip(pub, "link", "add", "br0", "type", "bridge")
        self._ip(pub, "addr", "add", f"{PUBLIC_IP}/{PUBLIC_PREFIX}", "dev", "br0")
        self._ip(pub, "addr", "add", f"{PUBLIC_IP_2}/{PUBLIC_PREFIX}", "dev", "br0")
        self._ip(pub, "link", "set", "br0", "up")
        self._veth("sink0", pub, "sink1", pub)
        self._ip(pub, "addr", "add", "192.0.2.1/30", "dev", "sink0")
        self._ip(pub, "route", "add", "default", "via", "192.0.2.2")
        for index in range(self.public_hosts):
            ns = self.public_host_ns(index)
            self._add_ns(ns)
            self._veth("eth0", ns, f"p{index}", pub)
            self._ip(pub, "link", "set", f"p{index}", "master", "br0")
            self._ip(ns, "addr", "add", f"{self.public_host_ip(index)}/{PUBLIC_PREFIX}", "dev", "eth0")
        for index, nat_type in enumerate(self.nat_types):
            site = Site(index, nat_type, f"{self.prefix}-r{index}", f"{self.prefix}-h{index}")
            self._add_ns(site.router_ns)
            self._add_ns(site.host_ns)
            port = f"r{index}"
            self._veth("wan", site.router_ns, port, pub)
            self._veth("lan", site.router_ns, "eth0", site.host_ns)
            if self.delay_ms > 0:
                self._delay_line(index, port)
            else:
                self._ip(pub, "link", "set", port, "master", "br0")
            self._ip(site.router_ns, "addr", "add", f"{site.wan_ip}/{PUBLIC_PREFIX}", "dev", "wan")
            self._ip(site.router_ns, "addr", "add", f"{site.gateway_ip}/24", "dev", "lan")
            self._ip(site.host_ns, "addr", "add", f"{site.host_ip}/24", "dev", "eth0")
            self._ip(site.host_ns, "route", "add", "default", "via", site.gateway_ip)
            # /proc/sys of the router's namespace, through sh: slim images lack the sysctl tool.
            self.exec(site.router_ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            self.sites.append(site)
            self.set_nat(index, nat_type)
        log.info("NAT lab %s up: %s", self.prefix, ", ".join(self.nat_types))

    def _delay_line(self, index: int, port: str) -> None:
        """router wan <-> `port` ~ labdelay ~ q<i> <-> b<i> on the bridge, with segmentation and checksum
        offload off: the delay line copies frames one by one, so it cannot send a 64 KiB GSO frame out
        again, and a frame whose checksum the sender left to "hardware" would arrive with a bad one."""
        if shutil.which("ethtool") is None:
            raise LabError("a delayed lab needs ethtool (apt-get install -y ethtool) to turn offloads off")
        pub = self.pub_ns
        near, far = f"q{index}", f"b{index}"
        self._veth(near, pub, far, pub)
        self._ip(pub, "link", "set", far, "master", "br0")
        for ns, dev in (
            (pub, port),
            (pub, near),
            (pub, far),
            (pub, "br0"),
            (self.sites_ns(index)[0], "wan"),
            (self.sites_ns(index)[0], "lan"),
        ):
            self._ip(ns, "link", "set", dev, "gso_max_segs", "1")
            self.exec(ns, ["ethtool", "-K", dev, "tx", "off", "gso", "off", "tso", "off"], check=False)
        for dev in (port, near):
            self._ip(pub, "link", "set", dev, "promisc", "on")
        line = self.spawn_python(
            pub, [str(LAB / "delay.py"), port, near, str(self.delay_ms)], stdout=subprocess.PIPE
        )
        ready, _, _ = select.select([line.stdout], [], [], COMMAND_TIMEOUT_S)
        if not ready or not line.stdout.readline().startswith(b"ready"):  # type: ignore[union-attr]
            raise LabError(f"the delay line on {port} did not start")

    def sites_ns(self, index: int) -> tuple[str, str]:
        return f"{self.prefix}-r{index}", f"{self.prefix}-h{index}"

    def down(self) -> None:
        """Stop our processes, then any left in our namespaces, then delete the namespaces."""
        for proc in self._procs:
            stop_process(proc)
        self._procs.clear()
        for ns in self._existing_namespaces():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        self.sites.clear()
        self._coturn_pidfile.unlink(missing_ok=True)

    def _existing_namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [name for name in names if name.startswith(f"{self.prefix}-")]

    # ------------------------------------------------------------------ changing the lab live

    def set_nat(self, index: int, nat_type: str) -> None:
        """Switch router `index` to `nat_type` and forget its NAT mappings."""
        site = self.sites[index]
        ruleset = nat_ruleset(nat_type, site.wan_ip, site.host_ip)
        self._run(["ip", "netns", "exec", site.router_ns, "nft", "-f", "-"], stdin=ruleset)
        site.nat_type = nat_type
        if shutil.which("conntrack"):
            self.exec(site.router_ns, ["conntrack", "-F"], check=False)

    def shape(self, index: int, rate: str | None) -> None:
        """Rate-limit router `index` both ways with tbf (`rate` like "20mbit"), or remove the limit."""
        site = self.sites[index]
        for dev in ("wan", "lan"):
            if rate is None:
                self.exec(site.router_ns, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                self.exec(
                    site.router_ns,
                    [
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        "64kb",
                        "latency",
                        "100ms",
                    ],
                )

    # ------------------------------------------------------------------ processes

    def exec(self, ns: str, argv: Sequence[str], *, check: bool = True) -> str:
        return self._run(["ip", "netns", "exec", ns, *argv], check=check)

    def spawn(self, ns: str, argv: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start `argv` inside namespace `ns` (from the repository root); `down()` stops it."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO_ROOT, **popen)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def spawn_python(self, ns: str, args: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Python in `ns` with `-P`: the repository root never goes ahead of the installed `shoal`."""
        return self.spawn(ns, [sys.executable, "-P", *args], **popen)

    def start_coturn(self, port: int = TURN_PORT) -> subprocess.Popen[bytes]:
        """coturn (STUN and TURN over UDP and TCP) on the public addresses, user lab/labpass."""
        if shutil.which("turnserver") is None:
            raise LabError("coturn is not installed: apt-get install -y coturn")
        return self.spawn(
            self.pub_ns,
            [
                "turnserver",
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--listening-ip",
                PUBLIC_IP,
                "--listening-ip",
                PUBLIC_IP_2,
                "--relay-ip",
                PUBLIC_IP,
                "--listening-port",
                str(port),
                "--lt-cred-mech",
                "--user",
                f"{TURN_USER}:{TURN_PASSWORD}",
                "--realm",
                "shoal.lab",
                "--min-port",
                "49152",
                "--max-port",
                "49999",
                "--no-stdout-log",
                "--log-file",
                "/dev/null",
                "--pidfile",
                str(self._coturn_pidfile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def _coturn_pidfile(self) -> Path:
        return Path(tempfile.gettempdir()) / f"{self.prefix}-turnserver.pid"

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_process(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    # ------------------------------------------------------------------ helpers

    def _add_ns(self, ns: str) -> None:
        self._run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _veth(self, name: str, ns: str, peer: str, peer_ns: str) -> None:
        self._run(
            ["ip", "link", "add", name, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns]
        )
        self._ip(ns, "link", "set", name, "up")
        self._ip(peer_ns, "link", "set", peer, "up")

    def _ip(self, ns: str, *args: str) -> None:
        self._run(["ip", "-n", ns, *args])

    def _run(self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
        try:
            done = subprocess.run(
                list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{' '.join(argv)} hung for {COMMAND_TIMEOUT_S} s") from exc
        if check and done.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout


def stop_process(proc: subprocess.Popen[Any], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL past `grace_s`; its pipes closed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    """Poll `predicate()` until true; LabError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
