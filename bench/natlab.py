"""NAT traversal in the NAT lab: every pair of NAT types, the path that won, time to connect, throughput.

    sudo python -m bench.natlab --json PATH [--bytes 16777216] [--repeats 1] [--rate 20mbit] [--delay-ms 12.5]

Builds the lab (`natlab/lab.py`: network namespaces, a public segment with a relay/STUN peer, two
private networks behind nftables NAT routers), then for every ordered pair of NAT types (a initiates to
b) starts one peer process behind each router, connects a to b through the path policy (direct, then
connection reversal or a TCP hole punch over a relayed connection: simultaneous open, or port prediction
when one NAT is symmetric; then ICE; else the relay) and sends `--bytes` over the path that won.
`connect_s` is the time from the connect call to a working connection on that path. A pair still relayed
gets one more punch (the daemon retries a minute later); `upgraded_later` marks where that won.

Baseline in the same run: kernel TCP with no Shoal layer (no Noise, no yamux, no relay) from the private
host behind router 0 to the public segment, through the same NAT, same size; each pair's `ratio_vs_tcp`
is its throughput over that. `--delay-ms D` puts a delay line on each router's uplink (this kernel has no
netem; `natlab/delay.py` copies frames in Python, so it also caps throughput at a few MB/s):
private-to-private RTT 4D, private-to-relay 2D. Needs root; prints why and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from natlab.lab import NAT_TYPES, PUBLIC_IP, NatLab, unavailable_reason
from natlab.pair import run_pair, start_relay

WALL_CLOCK_GUARD_S = 900  # the whole benchmark: a hung run is killed (and the lab removed), not waited on
BASELINE_PORT = 5999
# Pairs where hole punching is possible in principle (issue 8): both mappings endpoint-independent, or
# one side endpoint-independent in filtering too. Only the others may stay relayed.
MAY_STAY_RELAYED = {frozenset({"symmetric", "eim-apdf"}), frozenset({"symmetric"})}

SINK = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{ip}", {port})); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while (d := c.recv(1 << 20)):
    n += len(d)
c.sendall(n.to_bytes(8, "big")); c.close()
"""
SOURCE = """
import socket, time
c = socket.create_connection(("{ip}", {port})); buf = bytes(1 << 20); left = {size}
t = time.perf_counter()
while left > 0:
    c.sendall(buf[: min(left, len(buf))]); left -= min(left, len(buf))
c.shutdown(socket.SHUT_WR); n = int.from_bytes(c.recv(8), "big")
print({size} / (time.perf_counter() - t) / 1e6 if n == {size} else -1)
"""


def tcp_baseline(lab: NatLab, size: int) -> float:
    """MB/s of plain kernel TCP from private host 0 through its NAT to the public segment."""
    sink = lab.spawn_python(
        lab.pub_ns, ["-c", SINK.format(ip=PUBLIC_IP, port=BASELINE_PORT)], stdout=subprocess.PIPE
    )
    try:
        assert sink.stdout is not None
        sink.stdout.readline()
        out = lab.exec(
            lab.sites[0].host_ns,
            [sys.executable, "-c", SOURCE.format(ip=PUBLIC_IP, port=BASELINE_PORT, size=size)],
        )
        return float(out.strip())
    finally:
        lab.stop(sink)


def run(size: int, repeats: int, rate: str | None, delay_ms: float) -> dict[str, Any]:
    pairs: list[dict[str, Any]] = []
    with NatLab(list(NAT_TYPES[:2]), delay_ms=delay_ms) as lab:
        if rate:
            for index in range(len(lab.sites)):
                lab.shape(index, rate)
        baseline = tcp_baseline(lab, size)
        print(f"baseline: kernel TCP through one NAT, {size >> 20} MiB: {baseline:.1f} MB/s", flush=True)
        relay = start_relay(lab)
        for a in NAT_TYPES:
            for b in NAT_TYPES:
                lab.set_nat(0, a)
                lab.set_nat(1, b)
                for _ in range(repeats):
                    result = run_pair(lab, relay, size, retry_upgrade=True).as_dict()
                    result["ratio_vs_tcp"] = round(result["mb_s"] / baseline, 3) if result["mb_s"] else None
                    pairs.append(result)
                    mb_s = f"{result['mb_s']:.1f}" if result["mb_s"] else "-"
                    connect = f"{result['connect_s']:.3f}" if result["connect_s"] is not None else "-"
                    print(
                        f"{a:>9} -> {b:<9} connected={result['connected']!s:<5} path={result['path']!s:<9} "
                        f"connect_s={connect:<6} MB/s={mb_s:<7} ratio_vs_tcp={result['ratio_vs_tcp']}",
                        flush=True,
                    )
    connect_times = [p["connect_s"] for p in pairs if p["connect_s"] is not None]
    relayed_ok = all(p["path"] != "relay" or frozenset({p["a"], p["b"]}) in MAY_STAY_RELAYED for p in pairs)
    return {
        "pairs": pairs,
        "bytes": size,
        "rate": rate,
        "delay_ms_per_uplink": delay_ms,
        "baseline_tcp_mb_s": round(baseline, 1),
        "connect_s_p50": round(statistics.median(connect_times), 3) if connect_times else None,
        "all_connected": all(p["connected"] for p in pairs),
        "relayed_only_where_allowed": relayed_ok,
        "note": "2 shared CPU cores (other sessions running): MB/s are noisy; ratios are within one run",
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.natlab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--bytes", type=int, default=16 << 20, help="transfer size per pair (16 MiB)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per pair (for the connect-time p50)")
    parser.add_argument("--rate", default=None, help="tbf rate limit at each router, e.g. 20mbit")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay on each router's uplink")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"bench.natlab: cannot run: {reason}", file=sys.stderr)
        sys.exit(2)

    def _guard(*_: object) -> None:
        raise TimeoutError(f"bench.natlab passed its {WALL_CLOCK_GUARD_S} s wall-clock guard")

    signal.signal(signal.SIGALRM, _guard)
    signal.alarm(WALL_CLOCK_GUARD_S)
    started = time.monotonic()
    result = run(args.bytes, args.repeats, args.rate, args.delay_ms)
    signal.alarm(0)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(
        f"connected: {result['all_connected']}, relayed only where allowed: "
        f"{result['relayed_only_where_allowed']}, connect p50 {result['connect_s_p50']} s, "
        f"wall {result['wall_s']} s"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
