"""bench.link's matrix mode: 2..N real peers on a shaped, delayed segment, per (model, peers, rate).

    sudo python -m bench.link --peers 2,4 --rates 10mbit,25mbit,100mbit --rtt-ms 50 --models base \
        --rounds 5 [--inner-steps auto|N] [--batch-size N] --json PATH

For each model and peer count: first an unshaped run (Linux bridge, no tbf, no delay) of
`--calibration-steps` inner steps a round, which gives the time of one inner step and the payload's
bytes; then for each rate the inner steps that make a round's compute about `--compute-ratio` (2) times
its exchange at that rate (payload bytes each way over the rate, plus two RTTs), unless `--inner-steps N`;
then an unshaped baseline run with those inner steps (shared between rates that chose the same number)
and the shaped run (`bench.link_topology.Segment`: tbf on each peer's egress, the delay switch).

Per run, from the peers' events (`--json-events`):
- `swapped`: peer-rounds whose `round` event says `swapped` (of `peer_rounds`); `rounds_all_swapped`:
  rounds where every peer's did.
- `link_utilization`: per swapped pair of partners in a round, both directions' payload bytes over
  (2 x the tbf rate x the swap's transfer seconds), transfer seconds as in the two-peer mode (the smaller
  of the two peers' `seconds`); the median. `link_utilization_done`: the same over `done_s` (both
  ready to both done), over the aligned pairs only (peers ready within 10% of the transfer time).
- `compute_utilization`: training time over wall time over rounds 2..R (round 1 waits for the others).
  A round's training time is from the worker's `eval` event of the round before (sent after the outer
  step, the checkpoint and the evaluation) to the moment its payload reached the daemon (its `round`
  event's `t` less `seconds`): the inner steps plus the payload's encoding. Wall time is from round 1's
  `round` event to round R's.
- `worker_peak_rss_over_model`: the worker's peak RSS over the model's fp32 bytes: the larger of its
  VmHWM (a child of the daemon, sampled every second) and the peaks the worker reports for each phase of
  its rounds (`worker_peak_mb_by_phase`, from the `eval` events: the worker resets its VmHWM as each
  phase begins); `daemon_peak_rss_mb`: the daemon's VmHWM.
- `batch_size`: `--batch-size`, passed to every peer's `peer join` (the calibration's too); null: the
  peers' default (16).
- `encode_mb_s`: the model's fp32 bytes (4 x parameters) / 1e6 over the median `encode_seconds` of the
  swapped peer-rounds (all peers; the worker's making of the round's message, from the `round` event).
  `decode_mb_s`: the same over the median `outer_seconds` of those rounds (from the worker's `eval` event
  after each round): the partner's message decoded *and* the outer step applied, the guard's probe apart.
- `round_seconds_median`: per swapped peer-round (all peers), the median seconds of `train` (the inner
  steps), `encode`, `guard` (the guard's verdict on the partner's message), `outer` (decode + outer step),
  `snapshot` (the weights file for joiners) and `eval` (the evaluation): where a round's wall time goes
  besides the swap (`transfer_s_median`). `timed_peer_rounds`: how many peer-rounds those medians cover.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.link import SOURCE, PeerRun, join_argv, round_rows, start_peer
from bench.link_topology import Segment
from bench.natlab import SINK
from bench.peer_runs import REPO_ROOT, BenchError, tree_env, write_json
from shoal.peer.worker.memory import PHASE_PEAKS_ENV

RUN_ID = "link-matrix"
LISTEN_TIMEOUT_S = 300.0
KERNEL_PORT = 5995
CODEC_NOTE = (
    "MB/s of the model's fp32 bytes (4 x parameters / 1e6) over the median seconds of the swapped "
    "peer-rounds: encode_mb_s over the round event's encode_seconds (making the message); decode_mb_s "
    "over the eval event's outer_seconds (decoding the partner's message plus applying the outer step)"
)
# The phases of a round the worker times (`round_seconds_median`): (phase, event, field).
ROUND_PHASES = (
    ("train", "round", "train_seconds"),
    ("encode", "round", "encode_seconds"),
    ("guard", "eval", "guard_seconds"),
    ("outer", "eval", "outer_seconds"),
    ("snapshot", "eval", "snapshot_seconds"),
    ("eval", "eval", "eval_seconds"),
)


@dataclass(frozen=True)
class RunSpec:
    model: str
    peers: int
    rate: str | None  # tbf rate (e.g. "10mbit"); None: unshaped
    rtt_ms: float
    rounds: int
    inner_steps: int
    batch_size: int | None = None  # the peers' --batch-size; None: their default


def rate_bytes_per_s(rate: str) -> float:
    """tc's rate spelling (`10mbit`, `500kbit`, `1gbit`, `800bit`) in bytes per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    text = rate.strip().lower()
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale / 8
    raise ValueError(f"not a tc rate: {rate!r}")


def choose_inner_steps(
    step_s: float, bytes_each_way: float, rate: str, rtt_ms: float, ratio: float = 2.0, most: int = 2000
) -> int:
    """Inner steps whose compute is about `ratio` times the exchange: the payload each way over the rate,
    plus two round trips (the offer's handshake and the last acknowledgement)."""
    if step_s <= 0:
        raise ValueError("step_s must be positive")
    exchange_s = bytes_each_way / rate_bytes_per_s(rate) + 2 * rtt_ms / 1000
    return max(1, min(most, math.ceil(ratio * exchange_s / step_s)))


def training_windows(events: list[dict[str, Any]]) -> dict[int, float]:
    """Per round: seconds from the previous round's `eval` event to the payload reaching the daemon."""
    evals = {int(e["round"]): float(e["t"]) for e in events if e.get("event") == "eval" and "round" in e}
    windows = {}
    for e in events:
        if e.get("event") != "round":
            continue
        number = int(e["round"])
        start = evals.get(number - 1)
        ready = float(e["t"]) - float(e["seconds"])
        if start is not None and ready >= start:
            windows[number] = ready - start
    return windows


def compute_utilization(events: list[dict[str, Any]], skip: int = 1) -> dict[str, float] | None:
    """Training time over wall time over the rounds after the first `skip` (see the module's doc). Training
    time is the worker's own count of seconds in inner steps (`train_seconds` in the round event) where the
    peers report it, else the windows between events (`training_windows`), which with --overlap would miss
    the inner steps trained while a round was swapped."""
    rounds = {int(e["round"]): float(e["t"]) for e in events if e.get("event") == "round"}
    reported = {
        int(e["round"]): float(e["train_seconds"])
        for e in events
        if e.get("event") == "round" and isinstance(e.get("train_seconds"), int | float)
    }
    windows = reported if len(reported) == len(rounds) else training_windows(events)
    numbers = sorted(rounds)
    if len(numbers) <= skip:
        return None
    first, measured = numbers[skip - 1] if skip else None, numbers[skip:]
    if first is None or any(n not in windows for n in measured):
        return None
    wall = rounds[measured[-1]] - rounds[first]
    train = sum(windows[n] for n in measured)
    if wall <= 0:
        return None
    return {"train_s": train, "wall_s": wall, "utilization": train / wall, "rounds": float(len(measured))}


def round_phases(by_peer: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Per phase of `ROUND_PHASES`, its seconds in each swapped peer-round (all peers) that reports it:
    the `round` event's fields, and those of the `eval` event the worker sends after that round."""
    phases: dict[str, list[float]] = {name: [] for name, _, _ in ROUND_PHASES}
    for events in by_peer.values():
        evals = {int(e["round"]): e for e in events if e.get("event") == "eval" and "round" in e}
        for event in events:
            if event.get("event") != "round" or event.get("outcome") != "swapped":
                continue
            found = {"round": event, "eval": evals.get(int(event["round"]))}
            for name, source, field in ROUND_PHASES:
                value = (found[source] or {}).get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    phases[name].append(float(value))
    return phases


def codec_mb_s(parameters: int, seconds: list[float]) -> float | None:
    """The model's fp32 megabytes (4 x parameters / 1e6) over the median of `seconds`."""
    middle = statistics.median(seconds) if seconds else 0.0
    return round(4 * parameters / 1e6 / middle, 1) if parameters and middle > 0 else None


def pair_rows(by_peer: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per round and pair of partners that both have a `round` event naming the other (the
    two-peer mode's `round_rows`, a = the one named first), plus one per peer-round with no such pair."""
    ids = {name: _peer_id(events) for name, events in by_peer.items()}
    names = {peer_id: name for name, peer_id in ids.items() if peer_id}
    rounds = {
        name: {int(e["round"]): e for e in evs if e.get("event") == "round"} for name, evs in by_peer.items()
    }
    rows: list[dict[str, Any]] = []
    for number in sorted({n for table in rounds.values() for n in table}):
        paired: set[str] = set()
        for name in sorted(rounds):
            event = rounds[name].get(number)
            if name in paired or event is None:
                continue
            other = names.get(str(event.get("partner")))
            mate = rounds.get(other, {}).get(number) if other else None
            if (
                other
                and other not in paired
                and mate is not None
                and names.get(str(mate.get("partner"))) == name
            ):
                row = round_rows({number: event}, {number: mate})[0]
                row.update(a=name, b=other)
                paired.update((name, other))
            else:
                row = {
                    "round": number,
                    "a": name,
                    "b": None,
                    "outcome_a": event.get("outcome"),
                    "swapped": False,
                }
                paired.add(name)
            rows.append(row)
    return rows


def _peer_id(events: list[dict[str, Any]]) -> str | None:
    return next((str(e["peer"]) for e in events if e.get("peer")), None)


def link_utilization(rows: list[dict[str, Any]], rate: str) -> dict[str, Any]:
    line = rate_bytes_per_s(rate)
    plain, done = [], []
    for row in rows:
        if not row.get("swapped") or not row.get("transfer_s"):
            continue
        both = row["bytes_a_to_b"] + row["bytes_b_to_a"]
        row["link_utilization"] = round(both / (2 * line * row["transfer_s"]), 3)
        plain.append(row["link_utilization"])
        if row["aligned"] and row["done_s"] > 0:
            row["link_utilization_done"] = round(both / (2 * line * row["done_s"]), 3)
            done.append(row["link_utilization_done"])
    return {
        "link_utilization": _median(plain),
        "link_utilization_min": round(min(plain), 3) if plain else None,
        "link_utilization_done": _median(done),
        "swapped_pairs": len(plain),
        "aligned_pairs": len(done),
        "transfer_s_median": _median([r["transfer_s"] for r in rows if r.get("swapped")]),
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def worker_phase_peaks(by_peer: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Per phase of a round (inner, message, wait, outer, snapshot, eval, overlap), the highest peak RSS
    in MB any worker reported for it (`peak_mb` of the `eval` events)."""
    peaks: dict[str, int] = {}
    for events in by_peer.values():
        for event in events:
            if event.get("event") == "eval" and isinstance(event.get("peak_mb"), dict):
                for phase, mb in event["peak_mb"].items():
                    if isinstance(mb, int):
                        peaks[phase] = max(peaks.get(phase, 0), mb)
    return peaks


def summarize(spec: RunSpec, by_peer: dict[str, list[dict[str, Any]]], rss: dict[str, Any]) -> dict[str, Any]:
    """The per-config figures from each peer's events and the sampled peak RSS."""
    round_events = {n: [e for e in evs if e.get("event") == "round"] for n, evs in by_peer.items()}
    peer_rounds = sum(len(evs) for evs in round_events.values())
    swapped = sum(1 for evs in round_events.values() for e in evs if e.get("outcome") == "swapped")
    numbers = sorted({int(e["round"]) for evs in round_events.values() for e in evs})
    all_swapped = [
        n
        for n in numbers
        if all(
            any(int(e["round"]) == n and e.get("outcome") == "swapped" for e in evs)
            for evs in round_events.values()
        )
    ]
    not_swapped = [
        {"peer": name, "round": int(e["round"]), "outcome": e.get("outcome")}
        for name, evs in round_events.items()
        for e in evs
        if e.get("outcome") != "swapped"
    ]
    utils = {name: compute_utilization(evs) for name, evs in by_peer.items()}
    values = [u["utilization"] for u in utils.values() if u]
    windows = [w for evs in by_peer.values() for n, w in training_windows(evs).items() if n > 1]
    params = next(
        (int(e["parameters"]) for evs in by_peer.values() for e in evs if e.get("event") == "worker"), 0
    )
    phase_peaks = worker_phase_peaks(by_peer)
    # The worker resets its VmHWM at each phase's start, so a 1-s sample can miss a phase's peak: the
    # phases' own peaks (the `eval` events' `peak_mb`) count too.
    worker_hwm = max(
        max(rss.get("worker_kb", {}).values(), default=0), 1024 * max(phase_peaks.values(), default=0)
    )
    daemon_hwm = max(rss.get("daemon_kb", {}).values(), default=0)
    phases = round_phases(by_peer)
    result: dict[str, Any] = {
        "model": spec.model,
        "peers": spec.peers,
        "rate_mbit": rate_bytes_per_s(spec.rate) * 8 / 1e6 if spec.rate else None,
        "rtt_ms": spec.rtt_ms,
        "inner_steps": spec.inner_steps,
        "batch_size": spec.batch_size,
        "rounds": len(numbers),
        "peer_rounds": peer_rounds,
        "swapped": swapped,
        "rounds_all_swapped": len(all_swapped),
        "not_swapped": not_swapped,
        "compute_utilization": _median(values),
        "compute_utilization_per_peer": {
            n: round(u["utilization"], 3) if u else None for n, u in utils.items()
        },
        "round_compute_s_median": _median(windows),
        "parameters": params,
        "worker_peak_rss_over_model": round(worker_hwm * 1024 / (4 * params), 2)
        if params and worker_hwm
        else None,
        "worker_peak_rss_mb": round(worker_hwm / 1024, 1) if worker_hwm else None,
        "worker_peak_mb_by_phase": phase_peaks,
        "daemon_peak_rss_mb": round(daemon_hwm / 1024, 1) if daemon_hwm else None,
        "encode_mb_s": codec_mb_s(params, phases["encode"]),
        "decode_mb_s": codec_mb_s(params, phases["outer"]),  # decode + the outer step's apply
        "codec_note": CODEC_NOTE,
        "round_seconds_median": {name: _median(values) for name, values in phases.items()},
        "timed_peer_rounds": max((len(values) for values in phases.values()), default=0),
    }
    rows = pair_rows(by_peer)
    sent = [
        int(e["bytes_sent"]) for evs in round_events.values() for e in evs if e.get("outcome") == "swapped"
    ]
    result["payload_bytes_each_way"] = max(sent) if sent else None
    if spec.rate:
        result.update(link_utilization(rows, spec.rate))
    else:
        result["transfer_s_median"] = _median([r["transfer_s"] for r in rows if r.get("swapped")])
    result["pairs"] = rows
    return result


# ---------------------------------------------------------------------------------------- running peers


def _status_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return kids


def sample_rss(pids: dict[str, int], rss: dict[str, dict[str, int]]) -> None:
    """Peak RSS so far (VmHWM, kB) of each daemon and of its largest child (the worker)."""
    for name, pid in pids.items():
        daemon = _status_kb(pid)
        if daemon:
            rss["daemon_kb"][name] = max(rss["daemon_kb"].get(name, 0), daemon)
        worker = max((_status_kb(kid) for kid in _children(pid)), default=0)
        if worker:
            rss["worker_kb"][name] = max(rss["worker_kb"].get(name, 0), worker)


def peer_argv(spec: RunSpec, listen: str, shard: str, state: Path, args: argparse.Namespace) -> list[str]:
    argv = join_argv(
        RUN_ID, listen, state, args, rounds=spec.rounds, inner_steps=spec.inner_steps, model=spec.model,
        shard=shard, wait_peers=spec.peers, batch_size=spec.batch_size or None,
    )  # fmt: skip
    mode = getattr(args, "overlap", "auto")
    return argv + {"on": ["--overlap"], "off": ["--no-overlap"]}.get(mode, [])


def run_spec(spec: RunSpec, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One run on a fresh segment: the segment's checks (RTT, kernel TCP), the peers, the figures. The
    peers run this tree's code (PYTHONPATH, checked), also from a copy of the tree that is not installed."""
    # The workers report each phase's peak memory (`worker_peak_mb_by_phase`).
    env = {**tree_env(REPO_ROOT), PHASE_PEAKS_ENV: "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    checks: dict[str, Any] = {}
    rss: dict[str, dict[str, int]] = {"daemon_kb": {}, "worker_kb": {}}
    sysctls = dict(item.split("=", 1) for item in getattr(args, "sysctl", None) or [])
    with Segment(spec.peers, spec.rate, spec.rtt_ms if spec.rate else 0.0, sysctls) as seg:
        checks["rtt_ms_measured"] = seg.rtt_ms_measured(0, spec.peers - 1)
        if spec.rate:
            checks["kernel_tcp_mbit"] = kernel_tcp_mbit(seg, round(rate_bytes_per_s(spec.rate) * 4))
        peers: list[PeerRun] = []
        bootstrap = ""
        try:
            for i, (ns, address) in enumerate(zip(seg.namespaces, seg.addresses, strict=True)):
                name = f"p{i}"
                argv = peer_argv(spec, address, f"{i}/{spec.peers}", run_dir / name, args)
                if bootstrap:
                    argv += ["--bootstrap", bootstrap]
                peers.append(start_peer(seg, ns, name, argv, run_dir / f"peer-{name}", env, REPO_ROOT))
                if not bootstrap:
                    bootstrap = str(peers[0].wait_for("listening", LISTEN_TIMEOUT_S)["address"])
            pids = {peer.name: peer.proc.pid for peer in peers}  # `ip netns exec` execs: the daemon's pid
            while any(peer.proc.poll() is None for peer in peers):  # SIGALRM (the guard) interrupts this
                sample_rss(pids, rss)
                time.sleep(1.0)
            checks["exit_codes"] = {peer.name: peer.proc.returncode for peer in peers}
        finally:
            for peer in peers:
                seg.stop(peer.proc)
                peer._thread.join(timeout=5)
                peer._log.close()
    by_peer = {peer.name: peer.events for peer in peers}
    result = summarize(spec, by_peer, rss)
    result.update(checks, wall_s=round(time.monotonic() - started, 1), run_dir=str(run_dir))
    return result


def kernel_tcp_mbit(seg: Segment, size: int) -> float | None:
    """Kernel TCP, `size` bytes from peer 0 to peer 1 over the segment: payload Mbit/s (slow start in)."""
    sink = seg.spawn(
        seg.namespaces[1],
        [sys.executable, "-c", SINK.format(ip=seg.addresses[1], port=KERNEL_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    source = None
    try:
        assert sink.stdout is not None
        if not sink.stdout.readline().startswith("ready"):
            return None
        code = SOURCE.format(ip=seg.addresses[1], port=KERNEL_PORT, size=size, start=time.time() + 0.5)
        source = seg.spawn(seg.namespaces[0], [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        out, _ = source.communicate(timeout=120)
        seconds = float(out.strip() or -1)
        return round(size * 8 / seconds / 1e6, 1) if seconds > 0 else None
    finally:
        for proc in (source, sink):
            if proc is not None:
                seg.stop(proc)


# ---------------------------------------------------------------------------------------- the matrix


def step_seconds(result: dict[str, Any]) -> float:
    """One inner step's seconds in a run (its median round compute over its inner steps)."""
    compute = result.get("round_compute_s_median")
    if not compute:
        raise BenchError(f"the calibration run gave no round compute time: {result.get('not_swapped')}")
    return float(compute) / int(result["inner_steps"])


def run_matrix(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    configs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    calibrations: list[dict[str, Any]] = []
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    batch = getattr(args, "batch_size", None)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for peers in [int(p) for p in args.peers.split(",") if p.strip()]:
            tag = f"{model}-{peers}p"
            steps: dict[str, int] = {}
            if args.inner_steps == "auto":
                spec = RunSpec(
                    model, peers, None, 0.0, args.calibration_rounds, args.calibration_steps, batch
                )
                _say(f"{tag}: calibration, unshaped, {spec.inner_steps} inner steps ...")
                calibration = run_spec(spec, args, run_dir / f"{tag}-calibration")
                calibrations.append(_brief(calibration))
                step_s, size = step_seconds(calibration), calibration["payload_bytes_each_way"]
                if not size:
                    raise BenchError(f"{tag}: no swapped round in the calibration run")
                for rate in rates:
                    steps[rate] = choose_inner_steps(step_s, size, rate, args.rtt_ms, args.compute_ratio)
                _say(f"{tag}: step {step_s:.3f} s, payload {size} B each way: inner steps {steps}")
            else:
                steps = {rate: int(args.inner_steps) for rate in rates}
            baseline_of: dict[int, dict[str, Any]] = {}
            for rate in rates:
                count = steps[rate]
                if count not in baseline_of:
                    spec = RunSpec(model, peers, None, 0.0, args.rounds, count, batch)
                    _say(f"{tag}: unshaped baseline, {count} inner steps ...")
                    baseline_of[count] = _guarded_run(spec, args, run_dir / f"{tag}-unshaped-h{count}")
                    baselines.append(baseline_of[count])
                spec = RunSpec(model, peers, rate, args.rtt_ms, args.rounds, count, batch)
                _say(f"{tag}: {rate}, RTT {args.rtt_ms} ms, {count} inner steps ...")
                result = _guarded_run(spec, args, run_dir / f"{tag}-{rate}")
                base = baseline_of[count].get("compute_utilization")
                result["baseline_compute_utilization"] = base
                cu = result.get("compute_utilization")
                result["compute_vs_baseline"] = round(cu / base, 3) if cu and base else None
                configs.append(result)
                _say("  " + row_text(result))
                if args.json:  # what is done so far survives a later failure
                    write_json(_matrix(args, run_dir, calibrations, configs, baselines), args.json)
    return _matrix(args, run_dir, calibrations, configs, baselines)


def _matrix(
    args: argparse.Namespace,
    run_dir: Path,
    calibrations: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "config": {
            "rtt_ms": args.rtt_ms,
            "rounds": args.rounds,
            "inner_steps": args.inner_steps,
            "compute_ratio": args.compute_ratio,
            "batch_size": getattr(args, "batch_size", None),
            "code": str(REPO_ROOT),
            "overlap": getattr(args, "overlap", "auto"),
            "sysctl": list(getattr(args, "sysctl", None) or []),
            "threads": args.threads,
            "tbf": "rate R burst 64kb latency 100ms on each peer's egress",
            "delay": "a userspace switch in the hub holds each frame RTT/2 (this kernel has no netem)",
            "run_dir": str(run_dir),
        },
        "calibrations": calibrations,
        "configs": configs,
        "baselines": baselines,
    }


def _guarded_run(spec: RunSpec, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    try:
        return run_spec(spec, args, run_dir)
    except BenchError as exc:
        _say(f"  failed: {exc}")
        return {"model": spec.model, "peers": spec.peers, "rate": spec.rate, "error": str(exc)}


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "pairs"}


def _say(text: str) -> None:
    print(text, flush=True)


def row_text(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']} {r['peers']}p {r.get('rate')}: error {r['error']}"
    return (
        f"{r['model']:<10} {r['peers']}p {r['rate_mbit'] or 0:>5g} Mbit/s H={r['inner_steps']:<4} "
        f"rounds {r['rounds']} swapped {r['swapped']}/{r['peer_rounds']} link {r.get('link_utilization')} "
        f"(done {r.get('link_utilization_done')}) compute {r['compute_utilization']} "
        f"(baseline {r.get('baseline_compute_utilization')}) worker/model {r['worker_peak_rss_over_model']} "
        f"daemon {r['daemon_peak_rss_mb']} MB rtt {r.get('rtt_ms_measured')} tcp {r.get('kernel_tcp_mbit')}\n"
        f"           encode {r.get('encode_mb_s')} MB/s decode+outer {r.get('decode_mb_s')} MB/s; median s a "
        f"round: {phases_text(r.get('round_seconds_median') or {})}"
    )


def phases_text(medians: dict[str, float | None]) -> str:
    return " ".join(f"{name} {medians.get(name)}" for name, _, _ in ROUND_PHASES)


def print_matrix(result: dict[str, Any]) -> None:
    for r in result["configs"]:
        print(row_text(r))
        for item in r.get("not_swapped", []):
            print(f"    {item['peer']} round {item['round']}: {item['outcome']!r}")
