"""N peers on one shaped, delayed segment, for bench.link's matrix mode.

One namespace per peer (`shoal-lm<pid>-p<i>`, address 10.232.0.<i+1>/24) and a hub namespace
(`shoal-lm<pid>-hub`), one veth pair per peer (`lmp<i>` in the peer, `lmh<i>` in the hub). Each peer's
egress is shaped with `tc tbf` to the rate. This kernel has no netem (nor fq, etf, or any qdisc that
honours a departure time), so the delay is a small C program in the hub, compiled here with cc: a
learning Ethernet switch over the hub ends that holds every frame for half the RTT before sending it on,
so two peers see the RTT between them (each direction crosses the switch once). Frames are copied one by
one, so segmentation and checksum offloads are off on every veth end, as in the NAT lab's delay line.
Unshaped (`rate=None`, `rtt_ms=0`): a Linux bridge in the hub instead, no tbf, no delay, no switch.

Everything made is removed by `down()` (on errors too); the names carry the bench's pid, and the veth
names live only inside these namespaces, so they cannot collide with the two-peer mode's.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Self

from bench.peer_runs import BenchError
from natlab.lab import stop_process

COMMAND_TIMEOUT_S = 30
STOP_GRACE_S = 20.0
SUBNET = "10.232.0"
ECHO_PORT = 5996
UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("{ip}", {port})); print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64); s.sendto(data, peer)
"""
UDP_PING = """
import socket, statistics, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2.0); times = []
for i in range({count}):
    t = time.perf_counter(); s.sendto(bytes([i]), ("{ip}", {port}))
    try:
        s.recvfrom(64); times.append((time.perf_counter() - t) * 1000)
    except TimeoutError:
        pass
    time.sleep(0.1)
print(round(statistics.median(times), 2) if times else "")
"""

SWITCH_C = r"""
/* delayswitch DELAY_US IFACE...: a learning switch that sends each frame on DELAY_US after it came in. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define MAXPORTS 16
#define SLOTS 65536
#define FRAME 2048
#define MACS 256
struct slot { long long due; int port, len; unsigned char data[FRAME]; };
static struct slot *ring; static unsigned head, tail;
static unsigned char mac[MACS][6]; static int macport[MACS], nmac;
static long long now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000LL + t.tv_nsec / 1000; }
static int lookup(const unsigned char *m) { for (int i = 0; i < nmac; i++) if (!memcmp(mac[i], m, 6))
  return macport[i]; return -1; }
static void learn(const unsigned char *m, int port) { for (int i = 0; i < nmac; i++)
  if (!memcmp(mac[i], m, 6)) { macport[i] = port; return; }
  if (nmac < MACS) { memcpy(mac[nmac], m, 6); macport[nmac++] = port; } }
int main(int argc, char **argv) {
  if (argc < 3) return 2;
  long long delay = atoll(argv[1]); int n = argc - 2; struct pollfd pfd[MAXPORTS];
  ring = calloc(SLOTS, sizeof(struct slot)); if (!ring || n > MAXPORTS) return 2;
  for (int i = 0; i < n; i++) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)); if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_ll a = {0}; a.sll_family = AF_PACKET; a.sll_protocol = htons(ETH_P_ALL);
    a.sll_ifindex = if_nametoindex(argv[i + 2]);
    if (!a.sll_ifindex || bind(fd, (struct sockaddr *)&a, sizeof a)) { perror(argv[i + 2]); return 1; }
    int one = 1, buf = 8 << 20;
    setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf);
    pfd[i].fd = fd; pfd[i].events = POLLIN;
  }
  printf("ready\n"); fflush(stdout);
  unsigned long long dropped = 0;
  for (;;) {
    long long t = now_us(); struct timespec wait = {1, 0};
    if (head != tail) { long long d = ring[head % SLOTS].due - t; if (d < 0) d = 0;
      wait.tv_sec = d / 1000000; wait.tv_nsec = (d % 1000000) * 1000; }
    if (ppoll(pfd, n, &wait, NULL) < 0 && errno != EINTR) { perror("ppoll"); return 1; }
    for (int i = 0; i < n; i++) {
      if (!(pfd[i].revents & POLLIN)) continue;
      for (;;) {
        if (tail - head >= SLOTS) { char junk[FRAME];
          if (recv(pfd[i].fd, junk, sizeof junk, MSG_DONTWAIT) < 0) break; dropped++; continue; }
        struct slot *s = &ring[tail % SLOTS];
        ssize_t len = recv(pfd[i].fd, s->data, FRAME, MSG_DONTWAIT | MSG_TRUNC);
        if (len < 0) break;
        if (len > FRAME || len < 14) { dropped++; continue; }
        s->len = (int)len; s->port = i; s->due = now_us() + delay; learn(s->data + 6, i); tail++;
      }
    }
    t = now_us();
    while (head != tail && ring[head % SLOTS].due <= t) {
      struct slot *s = &ring[head % SLOTS]; int to = (s->data[0] & 1) ? -1 : lookup(s->data);
      for (int j = 0; j < n; j++)
        if (j != s->port && (to < 0 || to == j)) send(pfd[j].fd, s->data, s->len, 0);
      head++;
    }
  }
}
"""


def run_command(argv: list[str], *, check: bool = True, **kwargs: Any) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} hung for {COMMAND_TIMEOUT_S} s") from exc
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def stop(proc: subprocess.Popen[Any]) -> None:
    stop_process(proc, STOP_GRACE_S)  # a peer gets the time it needs to stop cleanly


def tear_down(procs: list[subprocess.Popen[Any]], namespaces: list[str]) -> None:
    """Stop our processes, then any left in our namespaces, then delete the namespaces (both lists end
    empty)."""
    for proc in procs:
        stop(proc)
    procs.clear()
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    namespaces.clear()


def build_switch(directory: Path) -> Path:
    """The delay switch, compiled into `directory`."""
    if shutil.which("cc") is None:
        raise BenchError("the delay switch needs a C compiler (cc): apt-get install -y gcc")
    source, binary = directory / "delayswitch.c", directory / "delayswitch"
    source.write_text(SWITCH_C)
    run_command(["cc", "-O2", "-o", str(binary), str(source)])
    return binary


class Namespaces:
    """Network namespaces this process makes (`up`) and removes with every process it started in them
    (`down`, also when `up` fails half-way): a context manager."""

    def __init__(self) -> None:
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.down()

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        tear_down(self._procs, self._made)

    def spawn(self, ns: str, argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        stop(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)


class Segment(Namespaces):
    """`peers` namespaces on one hub; each peer's egress shaped to `rate` (tbf), `rtt_ms` between peers;
    `sysctls` ({"net.ipv4.tcp_slow_start_after_idle": "0"}) set in each peer's namespace."""

    def __init__(self, peers: int, rate: str | None, rtt_ms: float, sysctls: dict[str, str] | None = None):
        super().__init__()
        self.sysctls = dict(sysctls or {})
        if not 2 <= peers <= 16:
            raise ValueError("2 to 16 peers")
        self.peers, self.rate, self.rtt_ms = peers, rate, rtt_ms
        prefix = f"shoal-lm{os.getpid()}"
        self.hub = f"{prefix}-hub"
        self.namespaces = [f"{prefix}-p{i}" for i in range(peers)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(peers)]
        self._tmp: Path | None = None

    @property
    def delayed(self) -> bool:
        return self.rtt_ms > 0

    def up(self) -> None:
        for ns in (self.hub, *self.namespaces):
            run_command(["ip", "netns", "add", ns])
            self._made.append(ns)
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            peer_dev, hub_dev = f"lmp{i}", f"lmh{i}"
            pair = ["type", "veth", "peer", "name", hub_dev, "netns", self.hub]
            run_command(["ip", "link", "add", peer_dev, "netns", ns, *pair])
            run_command(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", peer_dev])
            for key, value in self.sysctls.items():
                run_command(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])
            if self.delayed:  # the switch copies frames one by one: no GSO frames, no unfinished checksums
                for where, dev in ((ns, peer_dev), (self.hub, hub_dev)):
                    off = ["tx", "off", "rx", "off", "gso", "off", "tso", "off", "gro", "off"]
                    run_command(["ip", "netns", "exec", where, "ethtool", "-K", dev, *off], check=False)
            run_command(["ip", "-n", ns, "link", "set", peer_dev, "up"])
            run_command(["ip", "-n", self.hub, "link", "set", hub_dev, "up"])
            if self.rate:
                tbf = ["tbf", "rate", self.rate, "burst", "64kb", "latency", "100ms"]
                run_command(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", peer_dev, "root", *tbf]
                )
        hub_devs = [f"lmh{i}" for i in range(self.peers)]
        if self.delayed:
            self._start_switch(hub_devs)
        else:
            run_command(["ip", "-n", self.hub, "link", "add", "lmbr", "type", "bridge"])
            for dev in hub_devs:
                run_command(["ip", "-n", self.hub, "link", "set", dev, "master", "lmbr"])
            run_command(["ip", "-n", self.hub, "link", "set", "lmbr", "up"])

    def _start_switch(self, devs: list[str]) -> None:
        if shutil.which("ethtool") is None:
            raise BenchError("a delayed segment needs ethtool (apt-get install -y ethtool) for offloads")
        self._tmp = Path(tempfile.mkdtemp(prefix="shoal-lm-switch-"))
        binary = build_switch(self._tmp)
        for dev in devs:
            run_command(["ip", "-n", self.hub, "link", "set", dev, "promisc", "on"])
        delay_us = str(round(self.rtt_ms * 1000 / 2))
        switch = self.spawn(self.hub, [str(binary), delay_us, *devs], stdout=subprocess.PIPE)
        assert switch.stdout is not None
        ready, _, _ = select.select([switch.stdout], [], [], COMMAND_TIMEOUT_S)
        if not ready or not switch.stdout.readline().startswith(b"ready"):
            raise BenchError("the delay switch did not start")

    def rtt_ms_measured(self, src: int = 0, dst: int = 1, count: int = 7) -> float | None:
        """Median UDP round trip, peer `src` to peer `dst`, in ms (this machine has no ping); None: none."""
        echo = self.spawn(
            self.namespaces[dst],
            [sys.executable, "-c", UDP_ECHO.format(ip=self.addresses[dst], port=ECHO_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert echo.stdout is not None
            if not echo.stdout.readline().startswith("ready"):
                return None
            code = UDP_PING.format(ip=self.addresses[dst], port=ECHO_PORT, count=count)
            out = run_command(
                ["ip", "netns", "exec", self.namespaces[src], sys.executable, "-c", code], check=False
            )
            return float(out) if out.strip() else None
        finally:
            self.stop(echo)

    def down(self) -> None:
        tear_down(self._procs, self._made)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
