"""Peak memory of each peer's daemon (and worker) when a third peer joins a run and fetches its weights.

Issue 17: the daemon never holds a copy of the model. Starts three real `peer join --json-events`
processes on 127.0.0.1: a starts the run, b joins it, and once a has finished `--rounds-before` rounds and
b one, c joins the run in progress and fetches the run's weights from a member (the donor: the `source`
of c's `weights` event, matched to a or b by the peer id in their `listening` addresses). After c's first
`eval` event (its worker has adopted the weights: the fetch and the donor's serving are over) it reads
VmHWM, the kernel's peak resident set, from /proc/PID/status of each daemon (the `peer join` process) and
of each worker (the daemon's child), then stops the peers. A thread also samples every daemon's and
worker's VmRSS and RssAnon every 0.2 s as a cross-check (VmHWM is authoritative; RssAnon leaves out the
shared-memory segment a joiner's daemon writes the weights into, which VmHWM counts).

    python -m bench.join_memory [--model base] [--batch-size 2] [--rounds-before 2] [--code PATH ...]
        [--json PATH] [--dir DIR]

`--code PATH` (repeatable, or a comma list) measures another checkout too (an older commit's worktree,
say, for a before/after in one run): its peers run from PATH with `PYTHONPATH=PATH`, one tree after the
other (never two at once: their protocols may differ). Each result is labelled with its tree's commit
(`+dirty` when tracked files are modified). With `--code`, the first `--code` tree is the baseline: each
other tree's donor daemon peak is printed over its (`donor_peak_ratio_vs_baseline`). MB here is 2^20
bytes (/proc counts kB of 1024). The model's fp32 size is 4 bytes a parameter (from the `worker` event,
else c's `bytes_received`). `fetch s` runs from c's `worker` event (its worker is up; the daemon turns to
the run's weights) to its `weights` event; `start->weights s` from c's start. Each peer's events and
stderr log are kept in the run directory (`--dir`, default a new one in /tmp); its state dirs are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peer_runs import REPO_ROOT, BenchError, parse_code, pump_events, run_guarded, tree_env, tree_label

RUN_ID = "join-memory"
WALL_CLOCK_GUARD_S = 3600  # the whole benchmark: a hung run is stopped (its peers with it)
LISTEN_TIMEOUT_S = 180.0  # a peer's `listening` event
ROUNDS_TIMEOUT_S = 600.0  # a's `--rounds-before` rounds and b's first one
WEIGHTS_TIMEOUT_S = 600.0  # c's `weights` event: a big model on two shared cores is slow
EVAL_TIMEOUT_S = 900.0  # c's first `eval` after its weights: gpt2-small's took 4-5 min on a loaded 2-core VM
STOP_GRACE_S = 30.0
SAMPLE_S = 0.2
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
PEERS = ("a", "b", "c")


# ---------------------------------------------------------------------------------------- /proc


def status_kb(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile and RssShmem of a live process in kB; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M) if k in STATUS_FIELDS}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """`pid`'s child processes: from every thread's children list (a child belongs to the thread that
    forked it), else by scanning /proc/*/stat for its parent id."""
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in path.read_text().split())
    if found:
        return sorted(found)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the fields after the command's closing parenthesis: state, ppid, ...
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return sorted(found)


def workers_of(daemon: int) -> list[int]:
    """The daemon's training worker(s): its children running `shoal.peer.worker` (any child otherwise)."""
    kids = children(daemon)
    return [k for k in kids if "peer.worker" in cmdline(k)] or kids


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


# ---------------------------------------------------------------------------------------- trees


# ---------------------------------------------------------------------------------------- peers


class Peer:
    """One `peer join --json-events` process; its stdout events are read on a thread."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, run_dir: Path):
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._log = open(run_dir / f"peer-{name}.events.jsonl", "w")  # noqa: SIM115 (the reader closes it)
        with open(run_dir / f"peer-{name}.log", "w") as stderr:
            self.started = time.time()
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the peers itself
            )
        self.worker_pids: set[int] = set()  # every worker seen, so none outlives the benchmark
        self.sampled_kb: dict[str, int] = {}  # sampled peaks: daemon_VmRSS, worker_RssAnon, ...
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pump_events(self.proc.stdout, self._log, self._keep, stamp=True)
        self._queue.put(None)
        self._log.close()

    def _keep(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._queue.put(event)

    def wait_for(
        self, kind: str, timeout_s: float, match: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        """The next `kind` event that `match`es, events before it consumed."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise BenchError(
                    f"peer {self.name}: no matching `{kind}` event within {timeout_s:.0f} s"
                ) from exc
            if event is None:
                code = self.proc.wait()
                raise BenchError(f"peer {self.name} exited ({code}) before its `{kind}` event: see its log")
            if event.get("event") == kind and match(event):
                return event

    def peer_id(self) -> str | None:
        """From any event's `peer`, else the `listening` address's last component (after /p2p/)."""
        for event in self.events:
            if event.get("event") == "listening" and "/p2p/" in str(event.get("address", "")):
                return str(event["address"]).rsplit("/p2p/", 1)[1]
        return next((str(e["peer"]) for e in self.events if e.get("peer")), None)

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == kind), None)

    def sample(self) -> None:
        """Keeps the peak VmRSS and RssAnon of the daemon and of its worker(s) seen so far."""
        if self.proc.poll() is not None:
            return
        self.worker_pids.update(workers_of(self.proc.pid))
        rows = [("daemon", status_kb(self.proc.pid))]
        rows += [("worker", status_kb(pid)) for pid in list(self.worker_pids)]
        for role, status in rows:
            for field in ("VmRSS", "RssAnon"):
                key = f"{role}_{field}"
                self.sampled_kb[key] = max(self.sampled_kb.get(key, 0), status.get(field, 0))

    def memory(self) -> dict[str, Any]:
        """The daemon's and its worker's /proc numbers now (VmHWM: the peak so far), in MB."""
        workers = workers_of(self.proc.pid) if self.proc.poll() is None else []
        self.worker_pids.update(workers)
        out: dict[str, Any] = {}
        for role, pid in [("daemon", self.proc.pid), ("worker", workers[0] if workers else None)]:
            status = status_kb(pid) if pid is not None else {}
            row: dict[str, Any] = {"pid": pid}
            row.update({f"{k}_mb": mb(status.get(k)) for k in STATUS_FIELDS})
            row["sampled_peak_VmRSS_mb"] = mb(self.sampled_kb.get(f"{role}_VmRSS"))
            row["sampled_peak_RssAnon_mb"] = mb(self.sampled_kb.get(f"{role}_RssAnon"))
            out[role] = row
        if len(workers) > 1:
            out["other_children"] = workers[1:]
        return out

    def terminate(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()

    def stop(self, deadline: float) -> int:
        """Waits for the daemon until `deadline` (monotonic), kills it past it; then any worker of its
        still alive (it is in the daemon's process group: checked, so a reused pid is left alone)."""
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in list(self.worker_pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == self.proc.pid:
                    os.kill(pid, signal.SIGKILL)
        self._thread.join(timeout=5)
        return self.proc.returncode


class Sampler:
    """Samples every live peer's memory every SAMPLE_S seconds on a thread."""

    def __init__(self, peers: dict[str, Peer]):
        self.peers = peers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for peer in list(self.peers.values()):
                peer.sample()


def peer_command(args: argparse.Namespace, state: Path, bootstrap: str | None) -> list[str]:
    argv = [sys.executable, "-P", "-m", "shoal.peer", "join", "--run", RUN_ID]
    argv += ["--listen", "127.0.0.1:0", "--json-events", "--state-dir", str(state), "--rounds", "1000"]
    argv += ["--model", args.model, "--inner-steps", "1", "--batch-size", str(args.batch_size)]
    argv += ["--threads", "1"]
    return argv + (["--bootstrap", bootstrap] if bootstrap else [])


def measure_tree(args: argparse.Namespace, code: Path | None, run_dir: Path) -> dict[str, Any]:
    """a, b, then c joining from one tree (`code`, or this one); each process's memory after c's fetch."""
    root = code or REPO_ROOT
    env = tree_env(code)
    run_dir.mkdir(parents=True, exist_ok=True)
    peers: dict[str, Peer] = {}

    def start(name: str, bootstrap: str | None) -> Peer:
        peers[name] = Peer(name, peer_command(args, run_dir / name, bootstrap), env, root, run_dir)
        return peers[name]

    try:
        with Sampler(peers):
            a = start("a", None)
            address = str(a.wait_for("listening", LISTEN_TIMEOUT_S)["address"])
            b = start("b", address)
            b.wait_for("listening", LISTEN_TIMEOUT_S)
            # a run in progress, with b a member that trains (c may fetch from either)
            a.wait_for("round", ROUNDS_TIMEOUT_S, lambda e: int(e.get("round", 0)) >= args.rounds_before)
            b.wait_for("round", ROUNDS_TIMEOUT_S)
            c = start("c", address)
            weights = c.wait_for("weights", WEIGHTS_TIMEOUT_S)
            c.wait_for("eval", EVAL_TIMEOUT_S)  # its worker adopted the weights: the fetch is over
            for peer in peers.values():  # a peer gone takes its VmHWM with it
                if peer.proc.poll() is not None:
                    raise BenchError(
                        f"peer {peer.name} exited ({peer.proc.returncode}) before the measurement"
                    )
            memory = {name: peer.memory() for name, peer in peers.items()}
            rounds_at_join = {
                name: max((int(e["round"]) for e in peer.events if e.get("event") == "round"), default=0)
                for name, peer in peers.items()
                if name != "c"
            }
    finally:
        for peer in peers.values():  # all at once: they stop in parallel
            peer.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        exits = {name: peer.stop(deadline) for name, peer in peers.items()}
    ids = {name: peers[name].peer_id() for name in ("a", "b")}
    donor = next((name for name, pid in ids.items() if pid and pid == weights.get("source")), None)
    other = {"a": "b", "b": "a"}.get(donor or "")
    worker_event = c.first("worker") or a.first("worker") or {}
    parameters = worker_event.get("parameters")
    received = weights.get("bytes_received")
    model_bytes = 4 * int(parameters) if parameters else (int(received) if received else None)
    fetch_from = (c.first("worker") or {}).get("t")

    def daemon_peak(name: str | None) -> float | None:
        return memory[name]["daemon"]["VmHWM_mb"] if name else None

    def worker_peak(name: str | None) -> float | None:
        return memory[name]["worker"]["VmHWM_mb"] if name else None

    return {
        "parameters": parameters,
        "model_mb_fp32": round(model_bytes / 2**20, 2) if model_bytes else None,
        "bytes_received": received,
        "weights_round": weights.get("round"),
        "rounds_at_join": rounds_at_join,
        "peer_ids": {**ids, "c": c.peer_id()},
        "donor": donor,
        "donor_id": weights.get("source"),
        "donor_daemon_peak_mb": daemon_peak(donor),
        "other_daemon_peak_mb": daemon_peak(other),
        "joiner_daemon_peak_mb": daemon_peak("c"),
        "donor_worker_peak_mb": worker_peak(donor),
        "other_worker_peak_mb": worker_peak(other),
        "joiner_worker_peak_mb": worker_peak("c"),
        "fetch_s": round(float(weights["t"]) - float(fetch_from), 2) if fetch_from else None,
        "start_to_weights_s": round(float(weights["t"]) - c.started, 2),
        "memory": memory,
        "exit_codes": exits,
    }


# ---------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    codes = parse_code(args.code, "bench.join_memory")
    trees: list[Path | None] = [None, *codes]
    results: list[dict[str, Any]] = []
    for index, code in enumerate(trees):
        root = code or REPO_ROOT
        label = tree_label(root)
        print(f"peers from {root} ({label}): --model {args.model}, c joins after round {args.rounds_before}")
        sys.stdout.flush()
        started = time.monotonic()
        try:
            result = measure_tree(args, code, run_dir / f"tree{index}")
        except BenchError as exc:
            result = {"error": str(exc)}
            print(f"  failed: {exc} (logs in {run_dir / f'tree{index}'})", flush=True)
        for name in PEERS:  # checkpoints and snapshots: model-sized; the logs stay
            shutil.rmtree(run_dir / f"tree{index}" / name, ignore_errors=True)
        results.append({"tree": str(root), "label": label, "wall_s": round(time.monotonic() - started, 1)})
        results[-1].update(result)
    ratios: dict[str, float | None] = {}
    if codes:
        baseline = results[1].get("donor_daemon_peak_mb")
        for tree in results[:1] + results[2:]:
            peak = tree.get("donor_daemon_peak_mb")
            ratios[tree["label"]] = round(peak / baseline, 3) if peak and baseline else None
    return {
        "config": {
            "model": args.model,
            "batch_size": args.batch_size,
            "rounds_before": args.rounds_before,
            "inner_steps": 1,
            "threads": 1,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "run_dir": str(run_dir),
            "baseline": results[1]["label"] if codes else None,
        },
        "trees": results,
        "donor_peak_ratio_vs_baseline": ratios,
        "note": "peaks are VmHWM (MB = 2^20 bytes); a joiner's daemon also counts the worker's shared-memory "
        "segment it writes the weights into (RssShmem), which RssAnon leaves out",
    }


def _num(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_table(result: dict[str, Any]) -> None:
    head = f"{'tree':<14} {'model':<6} {'model MB':>8} {'donor':>5} {'donor dmn':>9} {'other dmn':>9}"
    head += f" {'joiner dmn':>10} {'donor wkr':>9} {'other wkr':>9} {'joiner wkr':>10} {'fetch s':>7}"
    print(f"{head} {'start->weights s':>16}")
    for tree in result["trees"]:
        if "error" in tree:
            print(f"{tree['label']:<14} {result['config']['model']:<6} failed: {tree['error']}")
            continue
        print(
            f"{tree['label']:<14} {result['config']['model']:<6} {_num(tree['model_mb_fp32'], 8, 2)} "
            f"{tree['donor'] or '?':>5} {_num(tree['donor_daemon_peak_mb'], 9)} "
            f"{_num(tree['other_daemon_peak_mb'], 9)} {_num(tree['joiner_daemon_peak_mb'], 10)} "
            f"{_num(tree['donor_worker_peak_mb'], 9)} {_num(tree['other_worker_peak_mb'], 9)} "
            f"{_num(tree['joiner_worker_peak_mb'], 10)} {_num(tree['fetch_s'], 7, 2)} "
            f"{_num(tree['start_to_weights_s'], 16, 2)}"
        )
    print("daemons, cross-check: VmHWM / sampled peak VmRSS / sampled peak RssAnon / RssShmem now (MB)")
    for tree in result["trees"]:
        for name in PEERS:
            daemon = tree.get("memory", {}).get(name, {}).get("daemon")
            if not daemon:
                continue
            role = "joiner" if name == "c" else ("donor" if name == tree["donor"] else "member")
            print(
                f"  {tree['label']:<14} {name} ({role:<6}) {_num(daemon['VmHWM_mb'], 7)} "
                f"{_num(daemon['sampled_peak_VmRSS_mb'], 7)} {_num(daemon['sampled_peak_RssAnon_mb'], 7)} "
                f"{_num(daemon['RssShmem_mb'], 7)}"
            )
    for label, ratio in result["donor_peak_ratio_vs_baseline"].items():
        baseline = result["config"]["baseline"]
        print(f"donor_peak_ratio_vs_baseline {label} / {baseline}: {ratio if ratio is not None else '-'}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.join_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base", help="model preset (base: 10.7 M parameters)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per inner step (2)")
    parser.add_argument("--rounds-before", type=int, default=2, help="a's rounds before c joins (2)")
    parser.add_argument(
        "--code", action="append", default=[], metavar="PATH", help="also measure another checkout's code"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--dir", default=None, help="run directory: events and logs (default: a new one)")
    parser.add_argument("--guard-s", type=int, default=WALL_CLOCK_GUARD_S, help="wall-clock guard (3600 s)")
    args = parser.parse_args()
    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-join-memory-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory (logs): {run_dir}", flush=True)

    result = run_guarded("bench.join_memory", args.guard_s, lambda: run(args, run_dir))
    print_table(result)
    print(f"wall {result['wall_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any("error" in tree for tree in result["trees"]) else 0


if __name__ == "__main__":
    sys.exit(main())
