"""One round's swap between two real peers over a rate-limited home link, both directions at once.

    sudo python -m bench.link [--rate 20mbit] [--model base] [--rounds 5] [--code PATH ...] [--json PATH]

Builds two network namespaces joined by a veth pair (10.231.0.1 and 10.231.0.2), each end shaped with
`tc tbf` to `--rate` on its egress, so each direction is limited to the rate on its own. Baseline in the
same run: kernel TCP (Python sockets, no Shoal layer) one way, a to b, sending one payload's bytes: the
line rate; and the same both ways at once (two connections, a to b and b to a together): the two-way
kernel rate. Then two real `peer join` processes, one in each namespace, train `--rounds` rounds of one
inner step each and swap their payloads every round.

A round's transfer time is the smaller of the two peers' `seconds` for it (the swap's wall time on that
peer includes waiting for the partner to be ready: the peer that was ready later waited least). Each
swapped round reports the bytes each way, the transfer seconds, the two-way throughput (bytes sent plus
received over the seconds), `ratio_vs_one_way_line` (that over twice the one-way kernel rate: 1.0 is both
directions at full line rate, a half-duplex swap is at most about 0.5) and `one_way_ratio` (the larger
direction's bytes over the seconds, over the one-way kernel rate). Medians over the swapped rounds
(`med`), and over the aligned ones (`med*`): a round is aligned when the peers were ready (event time
less `seconds`) within 10% of its transfer time of each other (`stagger`). In a staggered round the
earlier peer's bytes may move before the later one is ready, which the smaller `seconds` does not see:
it flatters the round, a half-duplex one most (its offer is read ahead while the answerer still trains).
The smaller `seconds` also ends early where a peer's swap ends once its last bytes are written rather
than delivered (a half-duplex answerer's: its answer may still sit in the send buffers). So each round
also reports `done_s`, from the moment both peers were ready to the moment both were done (event times),
and `ratio_done` (the two-way ratio over it): the transfer time of an aligned round in either design.

`--code PATH` (repeatable, or a comma list) measures the peers also with another checkout's code (both
peers from it: never two trees in one run, their run protocols may differ): `PYTHONPATH=PATH`, run from
PATH. Each result is labelled with its tree's commit (`+dirty` when tracked files are modified). Each
peer's stdout events and stderr log are kept under the run directory (`--dir`, default a new one in
/tmp). Needs root; prints why and exits 2 otherwise.

Matrix mode (`--peers`, `--rates` or `--models`; `bench/link_matrix.py`, topology in
`bench/link_topology.py`): N peers on one segment with tbf and a 50 ms RTT, per model, peer count and
rate: rounds swapped, link and compute utilization, peak memory, against an unshaped baseline:

    sudo python -m bench.link --peers 2,4 --rates 10mbit,25mbit,100mbit --rtt-ms 50 --models base \
        --rounds 5 [--inner-steps auto|N] [--batch-size N] --json PATH
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from bench.link_topology import Namespaces, run_command
from bench.natlab import SINK
from bench.peer_runs import REPO_ROOT, BenchError, parse_code, pump_events, run_guarded, tree_env, tree_label

WALL_CLOCK_GUARD_S = 1200  # the whole benchmark: a hung run is killed (and the namespaces removed)
LISTEN_TIMEOUT_S = 180.0  # for the first peer's `listening` event (its worker loads torch and the model)
ADDRESS_A, ADDRESS_B = "10.231.0.1", "10.231.0.2"
VETH_A, VETH_B = "link-a", "link-b"
PORT_AB, PORT_BA = 5998, 5999
RUN_ID = "link-bench"
# A round whose peers were ready within this fraction of its transfer time of each other is `aligned`:
# its transfer time is clean. Otherwise the earlier peer's bytes may have moved before the later one was
# ready (then the smaller `seconds` flatters the round, half duplex most of all: its offer is read ahead).
ALIGNED_FRACTION = 0.1
# A payload size for the kernel baselines when no peer swapped (`--bytes` overrides): base's ~5.5 MB.
FALLBACK_BYTES = 5_500_000

# Starts at wall time {start} (both sources of the two-way baseline together); prints its seconds.
SOURCE = """
import socket, time
c = socket.create_connection(("{ip}", {port})); buf = bytes(1 << 20); left = {size}
time.sleep(max(0.0, {start} - time.time()))
t = time.perf_counter()
while left > 0:
    c.sendall(buf[: min(left, len(buf))]); left -= min(left, len(buf))
c.shutdown(socket.SHUT_WR); n = int.from_bytes(c.recv(8), "big")
print(time.perf_counter() - t if n == {size} else -1)
"""


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}: apt-get install -y iproute2"
    return None


class Link(Namespaces):
    """Namespaces a and b, one veth pair between them, each end's egress shaped to `rate` with tbf."""

    def __init__(self, rate: str):
        super().__init__()
        self.rate = rate
        self.ns_a = f"shoal-link-a-{os.getpid()}"
        self.ns_b = f"shoal-link-b-{os.getpid()}"

    def up(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            run_command(["ip", "netns", "add", ns])
            self._made.append(ns)
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
        pair = ["type", "veth", "peer", "name", VETH_B, "netns", self.ns_b]
        run_command(["ip", "link", "add", VETH_A, "netns", self.ns_a, *pair])
        for ns, dev, address in ((self.ns_a, VETH_A, ADDRESS_A), (self.ns_b, VETH_B, ADDRESS_B)):
            run_command(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev])
            run_command(["ip", "-n", ns, "link", "set", dev, "up"])
            tbf = ["tbf", "rate", self.rate, "burst", "64kb", "latency", "100ms"]
            run_command(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf])
        run_command(["ip", "netns", "exec", self.ns_a, "ping", "-c", "1", "-W", "2", ADDRESS_B], check=False)


# ---------------------------------------------------------------------------------------- kernel baselines


def kernel_tcp(link: Link, size: int, both_ways: bool) -> dict[str, Any]:
    """Kernel TCP, `size` bytes a to b (and b to a at the same time when `both_ways`): seconds per
    direction and bytes/s (two-way: all bytes over the slower direction's seconds)."""
    flows = [(link.ns_a, link.ns_b, ADDRESS_B, PORT_AB)]
    if both_ways:
        flows.append((link.ns_b, link.ns_a, ADDRESS_A, PORT_BA))
    sinks, sources = [], []
    try:
        for _, sink_ns, ip, port in flows:
            sink = link.spawn(
                sink_ns,
                [sys.executable, "-c", SINK.format(ip=ip, port=port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            sinks.append(sink)
            assert sink.stdout is not None
            if not sink.stdout.readline().startswith("ready"):
                raise BenchError(f"the kernel TCP sink in {sink_ns} did not start")
        start = time.time() + 1.0
        for source_ns, _, ip, port in flows:
            code = SOURCE.format(ip=ip, port=port, size=size, start=start)
            sources.append(
                link.spawn(source_ns, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            )
        seconds = []
        for source in sources:
            out, _ = source.communicate(timeout=max(120.0, size / 50_000))
            value = float(out.strip() or -1)
            if value <= 0:
                raise BenchError("a kernel TCP transfer did not deliver all its bytes")
            seconds.append(value)
    finally:
        for proc in sources + sinks:
            link.stop(proc)
    directions = ["a->b", "b->a"][: len(flows)]
    return {
        "bytes_each_way": size,
        "seconds": dict(zip(directions, [round(s, 3) for s in seconds], strict=True)),
        "bytes_per_s_each_way": dict(zip(directions, [round(size / s) for s in seconds], strict=True)),
        "bytes_per_s": round(size * len(flows) / max(seconds)),
    }


# ---------------------------------------------------------------------------------------- peers


class PeerRun:
    """One `peer join --json-events` process in a namespace; its events are read on a thread."""

    def __init__(self, name: str, proc: subprocess.Popen[str], events_log: TextIO):
        self.name = name
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._log = events_log
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pump_events(self.proc.stdout, self._log, self._keep)
        self.lines.put(None)

    def _keep(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.lines.put(event)

    def wait_for(self, kind: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise BenchError(f"peer {self.name}: no `{kind}` event within {timeout_s:.0f} s") from exc
            if event is None:
                raise BenchError(f"peer {self.name} exited ({self.proc.wait()}) before its `{kind}` event")
            if event.get("event") == kind:
                return event

    def rounds(self) -> dict[int, dict[str, Any]]:
        return {int(e["round"]): e for e in self.events if e.get("event") == "round"}


def start_peer(
    space: Namespaces, ns: str, name: str, argv: list[str], logs: Path, env: dict[str, str], cwd: Path
) -> PeerRun:
    """`argv` (a `peer join --json-events`) started in namespace `ns`: its stderr to LOGS.log, its events
    to LOGS.events.jsonl, in a session of its own (Ctrl-C reaches the bench only; it stops the peers)."""
    stderr = open(f"{logs}.log", "w")  # noqa: SIM115 (the process keeps it)
    events_log = open(f"{logs}.events.jsonl", "w")  # noqa: SIM115
    proc = space.spawn(
        ns, argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd, start_new_session=True
    )
    stderr.close()
    return PeerRun(name, proc, events_log)


def join_argv(run: str, listen: str, state: Path, args: argparse.Namespace, **options: object) -> list[str]:
    """`peer join --json-events` on `listen` (an IPv4 address, any port), with the bench's `--threads` and
    `--exchange-timeout` and `options` (`inner_steps=2` -> `--inner-steps 2`; None: left out)."""
    argv = [
        sys.executable,
        "-P",
        "-m",
        "shoal.peer",
        "join",
        "--run",
        run,
        "--listen",
        f"/ip4/{listen}/tcp/0",
    ]
    argv += ["--json-events", "--threads", str(args.threads), "--state-dir", str(state)]
    argv += ["--exchange-timeout", str(args.exchange_timeout)]
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def peer_command(args: argparse.Namespace, listen: str, shard: str, state: Path) -> list[str]:
    return join_argv(
        RUN_ID,
        listen,
        state,
        args,
        rounds=args.rounds,
        inner_steps=1,
        model=args.model,
        shard=shard,
        wait_peers=2,
    )


def run_peers(link: Link, args: argparse.Namespace, code: Path | None, run_dir: Path) -> dict[str, Any]:
    """Both peers from one tree (`code`, or this one), `args.rounds` rounds; their round events."""
    root = code or REPO_ROOT
    env = tree_env(code)
    run_dir.mkdir(parents=True, exist_ok=True)
    peers: list[PeerRun] = []
    started = time.monotonic()
    bootstrap = ""  # the first peer's address, from its `listening` event
    try:
        for name, ns, listen, shard in (
            ("a", link.ns_a, ADDRESS_A, "0/2"),
            ("b", link.ns_b, ADDRESS_B, "1/2"),
        ):
            argv = peer_command(args, listen, shard, run_dir / name)
            if bootstrap:
                argv += ["--bootstrap", bootstrap]
            peers.append(start_peer(link, ns, name, argv, run_dir / f"peer-{name}", env, root))
            if not bootstrap:
                bootstrap = str(peers[0].wait_for("listening", LISTEN_TIMEOUT_S)["address"])
        for peer in peers:
            while peer.proc.poll() is None:  # SIGALRM (the wall-clock guard) interrupts this wait
                time.sleep(0.2)
        exits = {peer.name: peer.proc.returncode for peer in peers}
    finally:
        for peer in peers:
            link.stop(peer.proc)
            peer._thread.join(timeout=5)
            peer._log.close()
    wall = time.monotonic() - started
    rows = round_rows(peers[0].rounds(), peers[1].rounds())
    done = {peer.name: any(e.get("event") == "done" for e in peer.events) for peer in peers}
    return {"exit_codes": exits, "done": done, "rows": rows, "wall_s": round(wall, 1)}


def round_rows(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for number in sorted(set(a) | set(b)):
        ea, eb = a.get(number, {}), b.get(number, {})
        row: dict[str, Any] = {
            "round": number,
            "outcome_a": ea.get("outcome", "(no event)"),
            "outcome_b": eb.get("outcome", "(no event)"),
            "seconds_a": ea.get("seconds"),
            "seconds_b": eb.get("seconds"),
        }
        row["swapped"] = row["outcome_a"] == "swapped" and row["outcome_b"] == "swapped"
        if row["swapped"]:
            later = ea if ea["seconds"] <= eb["seconds"] else eb  # the peer that was ready later
            sent, received = int(later["bytes_sent"]), int(later["bytes_received"])
            seconds = float(later["seconds"])
            ready_a, ready_b = ea["t"] - ea["seconds"], eb["t"] - eb["seconds"]  # wall clock, one machine
            stagger = abs(ready_a - ready_b)
            row.update(
                bytes_a_to_b=int(ea["bytes_sent"]),
                bytes_b_to_a=int(eb["bytes_sent"]),
                transfer_s=seconds,
                transfer_from="a" if later is ea else "b",
                two_way_bytes_per_s=round((sent + received) / seconds) if seconds > 0 else None,
                max_one_way_bytes_per_s=round(max(sent, received) / seconds) if seconds > 0 else None,
                stagger_s=round(stagger, 3),
                span_s=round(max(ea["t"], eb["t"]) - min(ready_a, ready_b), 3),
                done_s=round(max(ea["t"], eb["t"]) - max(ready_a, ready_b), 3),
                aligned=stagger <= ALIGNED_FRACTION * seconds,
            )
        rows.append(row)
    return rows


def add_ratios(result: dict[str, Any], line_rate: float, kernel_two_way: float) -> None:
    swapped = [row for row in result["rows"] if row["swapped"] and row["transfer_s"] > 0]
    for row in swapped:
        row["ratio_vs_one_way_line"] = round(row["two_way_bytes_per_s"] / (2 * line_rate), 3)
        row["one_way_ratio"] = round(row["max_one_way_bytes_per_s"] / line_rate, 3)
        row["ratio_vs_kernel_two_way"] = round(row["two_way_bytes_per_s"] / kernel_two_way, 3)
        both = row["bytes_a_to_b"] + row["bytes_b_to_a"]
        row["done_ratio_vs_one_way_line"] = round(both / row["done_s"] / (2 * line_rate), 3)
    keys: tuple[str, ...] = ("bytes_a_to_b", "bytes_b_to_a", "transfer_s", "two_way_bytes_per_s", "stagger_s")
    keys += ("ratio_vs_one_way_line", "one_way_ratio", "ratio_vs_kernel_two_way", "done_s")
    keys += ("done_ratio_vs_one_way_line",)
    aligned = [row for row in swapped if row["aligned"]]
    result["swapped_rounds"] = len(swapped)
    result["aligned_rounds"] = len(aligned)
    for name, rows in (("median", swapped), ("median_aligned", aligned)):
        result[name] = (
            {key: round(statistics.median(row[key] for row in rows), 3) for key in keys} if rows else None
        )


# ---------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    trees: list[Path | None] = [None, *parse_code(args.code, "bench.link")]
    results: list[dict[str, Any]] = []
    with Link(args.rate) as link:
        for index, code in enumerate(trees):
            root = code or REPO_ROOT
            label = tree_label(root)
            print(
                f"peers from {root} ({label}): {args.rounds} rounds of --model {args.model} ...", flush=True
            )
            try:
                result = run_peers(link, args, code, run_dir / f"tree{index}")
            except BenchError as exc:
                result = {"error": str(exc), "rows": []}
                print(f"  failed: {exc}", flush=True)
            result = {"tree": str(root), "label": label, **result}
            for row in result["rows"]:
                if not row["swapped"]:
                    print(
                        f"  round {row['round']}: a {row['outcome_a']!r}, b {row['outcome_b']!r}", flush=True
                    )
            results.append(result)
        sizes = [
            max(r["bytes_a_to_b"], r["bytes_b_to_a"]) for t in results for r in t["rows"] if r["swapped"]
        ]
        size = args.bytes or (max(sizes) if sizes else FALLBACK_BYTES)
        one_way = kernel_tcp(link, size, both_ways=False)
        two_way = kernel_tcp(link, size, both_ways=True)
    line_rate = float(one_way["bytes_per_s"])
    for result in results:
        add_ratios(result, line_rate, float(two_way["bytes_per_s"]))
    return {
        "config": {
            "rate": args.rate,
            "model": args.model,
            "rounds": args.rounds,
            "inner_steps": 1,
            "threads": args.threads,
            "exchange_timeout": args.exchange_timeout,
            "tbf": "burst 64kb latency 100ms, on each end's egress",
            "run_dir": str(run_dir),
        },
        "kernel_one_way": one_way,
        "kernel_two_way": two_way,
        "kernel_two_way_ratio_vs_one_way_line": round(two_way["bytes_per_s"] / (2 * line_rate), 3),
        "trees": results,
        "note": "2 shared CPU cores (other sessions running): seconds are noisy; ratios are within one run",
    }


def print_table(result: dict[str, Any]) -> None:
    one, two = result["kernel_one_way"], result["kernel_two_way"]
    print(
        f"kernel TCP, {one['bytes_each_way']} B: one way {one['bytes_per_s'] / 1e6:.2f} MB/s (line); "
        f"both ways {two['bytes_per_s'] / 1e6:.2f} MB/s "
        f"(ratio_vs_one_way_line {result['kernel_two_way_ratio_vs_one_way_line']})"
    )
    head = f"{'tree':<16} {'round':>5} {'a->b B':>9} {'b->a B':>9} {'xfer s':>7} {'2-way MB/s':>10}"
    print(
        f"{head} {'ratio_2way':>10} {'one_way_ratio':>13} {'stagger s':>9} {'done s':>6} {'ratio_done':>10}"
    )
    for tree in result["trees"]:
        for row in tree["rows"]:
            if not row["swapped"]:
                print(
                    f"{tree['label']:<16} {row['round']:>5}  skipped "
                    f"(a: {row['outcome_a']}; b: {row['outcome_b']})"
                )
                continue
            print(
                f"{tree['label']:<16} {row['round']:>5} {row['bytes_a_to_b']:>9} {row['bytes_b_to_a']:>9} "
                f"{row['transfer_s']:>7.2f} {row['two_way_bytes_per_s'] / 1e6:>10.2f} "
                f"{row['ratio_vs_one_way_line']:>10.3f} {row['one_way_ratio']:>13.3f} "
                f"{row['stagger_s']:>9.2f} {row['done_s']:>6.2f} {row['done_ratio_vs_one_way_line']:>10.3f}"
            )
        for tag, median in (("med", tree.get("median")), ("med*", tree.get("median_aligned"))):
            if not median:
                continue
            print(
                f"{tree['label']:<16} {tag:>5} "
                f"{median['bytes_a_to_b']:>9.0f} {median['bytes_b_to_a']:>9.0f} "
                f"{median['transfer_s']:>7.2f} {median['two_way_bytes_per_s'] / 1e6:>10.2f} "
                f"{median['ratio_vs_one_way_line']:>10.3f} {median['one_way_ratio']:>13.3f} "
                f"{median['stagger_s']:>9.2f} {median['done_s']:>6.2f} "
                f"{median['done_ratio_vs_one_way_line']:>10.3f}"
            )
        if not tree.get("median"):
            print(f"{tree['label']:<16}  no swapped round: {tree.get('error') or tree.get('exit_codes')}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.link", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--rate", default="20mbit", help="tbf rate limit on each end's egress (20mbit)")
    parser.add_argument(
        "--model", default="base", help="model preset (base: 10.7 M parameters; small: quick)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per tree (5)")
    parser.add_argument(
        "--code", action="append", default=[], metavar="PATH", help="also measure another checkout's code"
    )
    parser.add_argument("--bytes", type=int, default=None, help="kernel baseline size (default: the payload)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    parser.add_argument("--exchange-timeout", type=float, default=300.0, help="the peers' (300 s)")
    parser.add_argument("--dir", default=None, help="run directory: state dirs, logs (default: a new one)")
    parser.add_argument("--guard-s", type=int, default=None, help="wall-clock guard (1200 s; matrix: 5400 s)")
    matrix = parser.add_argument_group("matrix mode (bench.link_matrix): N peers, rates, models")
    matrix.add_argument("--peers", default=None, help="peer counts, a comma list (e.g. 2,4)")
    matrix.add_argument("--rates", default=None, help="tbf rates, a comma list (e.g. 10mbit,25mbit,100mbit)")
    matrix.add_argument("--models", default=None, help="model presets, a comma list (e.g. base,gpt2-small)")
    matrix.add_argument("--rtt-ms", type=float, default=50.0, help="RTT between any two peers (50)")
    matrix.add_argument(
        "--inner-steps", default="auto", help="auto (compute ~ --compute-ratio x exchange) or N"
    )
    matrix.add_argument("--compute-ratio", type=float, default=2.0, help="round compute over exchange (2)")
    matrix.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        nargs="?",
        const="on",
        default="auto",
        help="the peers' overlap: auto (peer join's default), on (--overlap; the flag alone) or off "
        "(--no-overlap)",
    )
    matrix.add_argument(
        "--sysctl",
        action="append",
        metavar="KEY=VALUE",
        help="set in each peer's namespace (repeatable), e.g. net.ipv4.tcp_slow_start_after_idle=0",
    )
    matrix.add_argument(
        "--batch-size", type=int, default=None, help="the peers' --batch-size (default: theirs, 16)"
    )
    matrix.add_argument("--calibration-steps", type=int, default=4, help="inner steps of the calibration (4)")
    matrix.add_argument("--calibration-rounds", type=int, default=3, help="rounds of the calibration (3)")
    args = parser.parse_args()
    if args.peers or args.rates or args.models:
        main_matrix(args)
        return
    if args.batch_size is not None:
        raise SystemExit("bench.link: --batch-size is for the matrix mode only")
    args.guard_s = args.guard_s or WALL_CLOCK_GUARD_S
    run_dir = _run_dir(args, "shoal-link-")

    result = run_guarded("bench.link", args.guard_s, lambda: run(args, run_dir))
    print_table(result)
    print(
        f"med: all swapped rounds; med*: aligned rounds only (peers ready within "
        f"{ALIGNED_FRACTION:.0%} of the transfer time); stagger: |ready_a - ready_b| s;\n"
        f"done s: from both peers ready to both done (ratio_done: its ratio_2way); wall {result['wall_s']} s"
    )
    for tree in (run_dir / f"tree{i}" for i in range(len(result["trees"]))):
        for state in (tree / "a", tree / "b"):  # checkpoints; the logs stay
            shutil.rmtree(state, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


def main_matrix(args: argparse.Namespace) -> None:
    from bench import link_matrix  # it imports this module

    args.peers, args.rates, args.models = (
        args.peers or "2",
        args.rates or args.rate,
        args.models or args.model,
    )
    if args.code:
        raise SystemExit("bench.link: --code is for the two-peer mode only")
    if args.inner_steps != "auto" and not args.inner_steps.isdigit():
        raise SystemExit("bench.link: --inner-steps is auto or a positive integer")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit("bench.link: --batch-size is a positive integer")
    run_dir = _run_dir(args, "shoal-link-matrix-")
    result = run_guarded("bench.link", args.guard_s or 5400, lambda: link_matrix.run_matrix(args, run_dir))
    link_matrix.print_matrix(result)
    print(f"wall {result['wall_s']} s")
    for state in run_dir.glob("*/p*"):  # checkpoints; the logs stay
        if state.is_dir():
            shutil.rmtree(state, ignore_errors=True)
    if args.json:
        link_matrix.write_json(result, args.json)


def _run_dir(args: argparse.Namespace, prefix: str) -> Path:
    """Exits 2 with the reason when this machine cannot run the benchmark; else the run directory."""
    reason = unavailable_reason()
    if reason:
        print(f"bench.link: cannot run: {reason}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory (logs): {run_dir}", flush=True)
    return run_dir


if __name__ == "__main__":
    main()
