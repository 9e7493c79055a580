"""How long a late joiner takes to get a run's weights over home links: from one member, or from three at
once (the mosaic fetch, each member's part checked against the others' by probes), honest or not.

    sudo python -m bench.join [--rate 10mbit] [--rtt-ms 50] [--model base] [--members 1,3]
        [--liar-members 3 | --liar-members 0] [--code PATH ...] [--json PATH] [--dir DIR]

Per config, one `bench.link_topology.Segment` of M + 1 namespaces on a hub (each peer's egress shaped with
tbf to `--rate`, `--rtt-ms` between any two through the delay switch): M members start together
(`--wait-peers M`, `--shard i/M`, `--inner-steps` 2, `--threads` 1, `--rounds` large), and once every member
has finished round `--join-after` (2; its `round` events) a joiner starts in the last namespace with
`--bootstrap` the first member's address. Measured:

- `total_s`: from the joiner's process start to its `weights` event (torch and the model load, the
  membership, the run settings check, the fetch);
- `fetch_s`: from the joiner's first log line that starts a fetch (stderr: "fetching 14.3 MB of the run's
  weights from ..." since the mosaic fetch, "fetching the run's weights (43.0 MB) from ..." before it; its
  timestamp, "YYYY-MM-DD HH:MM:SS,mmm", local time, 1 ms) to the `weights` event (its `t`);
- `bytes_received`, `sources` ({member: bytes}; an old tree's event names one `source`, which sent all),
  `refused` ({member: why}), the weights' `round`, the fetch's Mbit/s;
- the joiner's first `eval` loss (its worker evaluates the fetched weights before it trains) against the
  members' eval losses of the same round and their latest ones at that moment.

Configs: `--members` (1,3) from this tree; with `--liar-members N` (3; 0: none) N honest members plus one
`--behave made_up_weights` member (serves noise of its weights' norm to joiners and probes; trains and
swaps as usual), the last of the N + 1; and with `--code PATH` (repeatable) the `--members` configs again
from another checkout (members and joiner from it: never two trees in one run). The 1- and 3-member runs go
tree after tree, so a load that drifts (other benchmarks on the machine) hits the trees alike. Printed: a
table, per tree fetch_s(3 members) / fetch_s(1 member), and this tree's 3-member fetch over each other
tree's. Each peer's events and stderr are kept in the run directory (`--dir`, default a new one in /tmp);
state dirs are removed. A config slower than its timeouts is cut (its error recorded) and the next one runs.
Needs root; prints why and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.link import PeerRun, join_argv, start_peer, unavailable_reason
from bench.link_matrix import kernel_tcp_mbit, rate_bytes_per_s
from bench.link_topology import Segment
from bench.peer_runs import REPO_ROOT, BenchError, parse_code, run_guarded, tree_env, tree_label, write_json

RUN_ID = "join-bench"
WALL_CLOCK_GUARD_S = 3300  # the whole benchmark: a hung run is stopped (its namespaces removed)
LISTEN_TIMEOUT_S = 300.0  # the first member's `listening` event
# A fetch starts: "fetching 14.3 MB of the run's weights from ID: ..." (mosaic), or before it "fetching the
# run's weights (43.0 MB) from ID: ..." (one member at a time).
FETCH_LINE = re.compile(r"fetching .*the run's weights")
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")
NOTE_LINE = re.compile(r"were refused|goes on without|did not answer a probe|could not fetch|was cut")
LIAR = "made_up_weights"
# The joiner gave up on the run's weights (mosaic; one member at a time) and trains from its own.
NO_WEIGHTS = re.compile(r"could not fetch the run's weights|no member sent its weights")


@dataclass(frozen=True)
class JoinSpec:
    members: int  # honest members
    liar: bool  # one more member, `--behave made_up_weights`, the last one
    code: Path | None  # the tree; None: this one

    @property
    def peers(self) -> int:
        return self.members + int(self.liar)

    def name(self) -> str:
        return f"{self.members}{'+liar' if self.liar else ''}"


# ---------------------------------------------------------------------------------------- pure parts


def log_time(line: str) -> float | None:
    """A log line's timestamp ("YYYY-MM-DD HH:MM:SS,mmm ...", this machine's local time) in epoch seconds;
    None for a line without one."""
    found = LOG_TIME.match(line)
    if not found:
        return None
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fetch_start(lines: Iterable[str]) -> tuple[float | None, str | None]:
    """The time and text of the first log line that starts a fetch of the run's weights."""
    for line in lines:
        if FETCH_LINE.search(line):
            stamp = log_time(line)
            if stamp is not None:
                return stamp, line.rstrip("\n")
    return None, None


def log_notes(lines: Iterable[str], most: int = 12) -> list[str]:
    """The joiner's log lines about members refused, dropped or cut during its fetch."""
    return [line.rstrip("\n") for line in lines if NOTE_LINE.search(line)][:most]


def _first(events: list[dict[str, Any]], kind: str, after: float = 0.0) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == kind and float(e.get("t", 0)) >= after), None)


def _peer_id(events: list[dict[str, Any]]) -> str | None:
    return next((str(e["peer"]) for e in events if e.get("peer")), None)


def _loss(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarize(
    joiner_start: float,
    joiner: list[dict[str, Any]],
    members: dict[str, list[dict[str, Any]]],
    fetch_from: float | None,
    liar: str | None = None,
) -> dict[str, Any]:
    """The figures of one config from the joiner's events (its start time, epoch s), the members' events
    (by name) and the joiner's first fetch log line's time; `liar`: the name of the member that made up
    its weights."""
    names = {pid: name for name, events in members.items() if (pid := _peer_id(events))}
    weights = _first(joiner, "weights")
    if weights is None:
        raise BenchError("the joiner sent no `weights` event")
    t = float(weights["t"])
    received = int(weights.get("bytes_received") or 0)
    raw_sources = weights.get("sources")
    if isinstance(raw_sources, dict):
        sources = {str(k): int(v) for k, v in raw_sources.items()}
    else:  # before the mosaic: one member sent the lot
        sources = {str(weights.get("source")): received}
    refused = {str(k): str(v) for k, v in (weights.get("refused") or {}).items()}
    worker = _first(joiner, "worker")
    fetch_s = t - fetch_from if fetch_from is not None else None
    result: dict[str, Any] = {
        "total_s": round(t - joiner_start, 2),
        "fetch_s": round(fetch_s, 2) if fetch_s is not None else None,
        "worker_to_weights_s": round(t - float(worker["t"]), 2) if worker else None,
        "bytes_received": received,
        "fetch_mbit_s": round(received * 8 / fetch_s / 1e6, 1) if fetch_s and fetch_s > 0 else None,
        "weights_round": weights.get("round"),
        "sources_reported": isinstance(raw_sources, dict),
        "sources": {names.get(k, k): v for k, v in sources.items()},
        "refused": {names.get(k, k): v for k, v in refused.items()},
        "member_ids": {name: pid for pid, name in names.items()},
    }
    rounds_at_join = {
        name: max((int(e["round"]) for e in evs if e.get("event") == "round" and e["t"] <= joiner_start),
                  default=0)
        for name, evs in members.items()
    }  # fmt: skip
    result["rounds_at_join"] = rounds_at_join
    if liar is not None:
        result["liar"] = liar
        result["liar_sent"] = liar in result["sources"] or liar in result["refused"]
        result["liar_refused"] = liar in result["refused"]
        result["liar_bytes_kept"] = result["sources"].get(liar, 0)
    extra = received - sum(sources.values())
    result["bytes_fetched_again"] = extra  # refused spans (and resumed ones) come twice
    first_eval = _first(joiner, "eval", after=t)
    result["joiner_eval"] = (
        {"round": first_eval.get("round"), "loss": _loss(first_eval.get("eval_loss"))} if first_eval else None
    )
    at_round: dict[str, float | None] = {}
    latest: dict[str, dict[str, Any]] = {}
    until = float(first_eval["t"]) if first_eval else t
    for name, evs in members.items():
        evals = [e for e in evs if e.get("event") == "eval" and "round" in e]
        same = [e for e in evals if weights.get("round") is not None and e["round"] == weights["round"]]
        at_round[name] = _loss(same[-1].get("eval_loss")) if same else None
        before = [e for e in evals if float(e["t"]) <= until]
        if before:
            latest[name] = {"round": before[-1]["round"], "loss": _loss(before[-1].get("eval_loss"))}
    result["members_eval_at_weights_round"] = at_round
    result["members_latest_eval"] = latest
    honest = [v["loss"] for n, v in latest.items() if n != liar and v["loss"] is not None]
    result["members_latest_eval_median"] = round(statistics.median(honest), 4) if honest else None
    same_round = [v for n, v in at_round.items() if n != liar and v is not None]
    result["members_eval_at_weights_round_median"] = (
        round(statistics.median(same_round), 4) if same_round else None
    )
    joined = result["joiner_eval"]["loss"] if result["joiner_eval"] else None
    base = result["members_eval_at_weights_round_median"] or result["members_latest_eval_median"]
    result["joiner_eval_over_members"] = round(joined / base, 4) if joined and base else None
    return result


def ratios(configs: list[dict[str, Any]], this_label: str) -> dict[str, Any]:
    """Per tree fetch_s and total_s of 3 members over 1 (the largest honest config over the smallest, no
    liar), and this tree's largest config over each other tree's, from the configs that measured them."""
    by_tree: dict[str, dict[int, dict[str, Any]]] = {}
    for c in configs:
        if c.get("error") or c.get("liar") or c.get("fetch_s") is None:
            continue
        by_tree.setdefault(c["label"], {})[int(c["members"])] = c
    out: dict[str, Any] = {"per_tree": {}, "vs_this_tree": {}}
    for label, runs in by_tree.items():
        if len(runs) < 2:
            continue
        low, high = runs[min(runs)], runs[max(runs)]
        out["per_tree"][label] = {
            "members": [min(runs), max(runs)],
            "fetch_s_ratio": round(high["fetch_s"] / low["fetch_s"], 3),
            "total_s_ratio": round(high["total_s"] / low["total_s"], 3),
        }
    mine = by_tree.get(this_label, {})
    for label, runs in by_tree.items():
        if label == this_label:
            continue
        for members in sorted(set(runs) & set(mine)):
            out["vs_this_tree"][f"{this_label}/{label} {members} members"] = {
                "fetch_s_ratio": round(mine[members]["fetch_s"] / runs[members]["fetch_s"], 3),
                "total_s_ratio": round(mine[members]["total_s"] / runs[members]["total_s"], 3),
            }
    return out


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


# ---------------------------------------------------------------------------------------- running peers


def peer_argv(args: argparse.Namespace, listen: str, shard: str | None, state: Path) -> list[str]:
    return join_argv(
        RUN_ID, listen, state, args, rounds=args.rounds, inner_steps=args.inner_steps, model=args.model,
        batch_size=args.batch_size or None, shard=shard,
    )  # fmt: skip


def _wait(what: str, timeout_s: float, done: Any, peers: list[PeerRun]) -> None:
    """Polls `done()` (peers' events are read on their threads) until true; BenchError past `timeout_s` or
    when a peer exits."""
    deadline = time.monotonic() + timeout_s
    while not done():
        for peer in peers:
            if peer.proc.poll() is not None:
                raise BenchError(f"peer {peer.name} exited ({peer.proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout_s:.0f} s: cut")
        time.sleep(0.2)


def _last_round(peer: PeerRun) -> int:
    return max((int(e["round"]) for e in list(peer.events) if e.get("event") == "round"), default=0)


def run_config(args: argparse.Namespace, spec: JoinSpec, run_dir: Path) -> dict[str, Any]:
    """One config on a fresh segment: the members, then the joiner once they finished --join-after rounds."""
    root = spec.code or REPO_ROOT
    env = tree_env(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    checks: dict[str, Any] = {"load_start": load_average()}
    with Segment(spec.peers + 1, args.rate, args.rtt_ms) as seg:
        checks["rtt_ms_measured"] = seg.rtt_ms_measured(0, spec.peers)
        checks["kernel_tcp_mbit"] = kernel_tcp_mbit(seg, round(rate_bytes_per_s(args.rate) * 4))
        members: list[PeerRun] = []
        joiner: PeerRun | None = None
        bootstrap = ""

        def start(name: str, index: int, shard: str | None, extra: list[str]) -> PeerRun:
            ns, address = seg.namespaces[index], seg.addresses[index]
            argv = peer_argv(args, address, shard, run_dir / name) + extra
            if bootstrap:
                argv += ["--bootstrap", bootstrap]
            return start_peer(seg, ns, name, argv, run_dir / name, env, root)

        names = [f"m{i}" for i in range(spec.members)] + (["liar"] if spec.liar else [])
        try:
            for i, name in enumerate(names):
                extra = ["--wait-peers", str(spec.peers)]
                if name == "liar":
                    extra += ["--behave", LIAR]
                members.append(start(name, i, f"{i}/{spec.peers}", extra))
                if not bootstrap:
                    bootstrap = str(members[0].wait_for("listening", LISTEN_TIMEOUT_S)["address"])
            _wait(
                f"round {args.join_after} finished by every member",
                args.rounds_timeout,
                lambda: all(_last_round(m) >= args.join_after for m in members),
                members,
            )
            checks["load_at_join"] = load_average()
            checks["members_ready_s"] = round(time.monotonic() - started, 1)
            _say(f"  members at rounds {[_last_round(m) for m in members]}: the joiner starts")
            joiner_start = time.time()
            joiner = start("joiner", spec.peers, f"{spec.peers}/{spec.peers + 1}", [])
            _wait(
                "`weights` event from the joiner",
                args.weights_timeout,
                lambda: any(e.get("event") in ("weights", "eval") for e in list(joiner.events)),
                [*members, joiner],
            )
            if _first(joiner.events, "weights") is None:  # its worker began from its own weights
                text = (run_dir / "joiner.log").read_text(errors="replace").splitlines()
                why = [line for line in text if NO_WEIGHTS.search(line)] or ["(no reason in its log)"]
                raise BenchError(f"the joiner began without the run's weights: {why[0]}")
            weights_t = float(_first(joiner.events, "weights")["t"])  # type: ignore[index]
            _wait(
                "first `eval` event from the joiner",
                args.eval_timeout,
                lambda: _first(joiner.events, "eval", after=weights_t) is not None,
                [*members, joiner],
            )
            checks["load_end"] = load_average()
        finally:
            everyone = [*members, *([joiner] if joiner else [])]
            for peer in everyone:  # all stop together; then each is waited for
                if peer.proc.poll() is None:
                    peer.proc.terminate()
            for peer in everyone:
                seg.stop(peer.proc)
                peer._thread.join(timeout=5)
                peer._log.close()
    lines = (run_dir / "joiner.log").read_text(errors="replace").splitlines()
    fetch_from, fetch_line = fetch_start(lines)
    by_name = {m.name: list(m.events) for m in members}
    result = summarize(joiner_start, list(joiner.events), by_name, fetch_from, "liar" if spec.liar else None)
    result.update(fetch_line=fetch_line, joiner_log_notes=log_notes(lines))
    result.update(checks, wall_s=round(time.monotonic() - started, 1))
    return result


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    trees: list[Path | None] = [None, *parse_code(args.code, "bench.join")]
    labels = {tree: tree_label(tree or REPO_ROOT) for tree in trees}
    specs = [JoinSpec(m, False, tree) for m in args.member_counts for tree in trees]
    if args.liar_members:
        specs.append(JoinSpec(args.liar_members, True, None))
    configs: list[dict[str, Any]] = []
    for index, spec in enumerate(specs):
        root = spec.code or REPO_ROOT
        head = {"tree": str(root), "label": labels[spec.code], "config": spec.name(), "members": spec.members}
        head["liar"] = spec.liar
        _say(f"[{index + 1}/{len(specs)}] {labels[spec.code]} ({root}): {spec.name()} members ...")
        directory = run_dir / f"{index}-{'this' if spec.code is None else 'code'}-{spec.name()}"
        try:
            result = {**head, **run_config(args, spec, directory), "run_dir": str(directory)}
            _say("  " + row_text(result))
        except BenchError as exc:
            result = {**head, "error": str(exc), "run_dir": str(directory), "load": load_average()}
            _say(f"  failed: {exc}")
        configs.append(result)
        for state in directory.glob("*"):  # checkpoints and keys; the logs stay
            if state.is_dir():
                shutil.rmtree(state, ignore_errors=True)
        if args.json:  # what is done so far survives a later failure
            write_json(_result(args, run_dir, configs, labels[None]), args.json)
    return _result(args, run_dir, configs, labels[None])


def _result(
    args: argparse.Namespace, run_dir: Path, configs: list[dict[str, Any]], label: str
) -> dict[str, Any]:
    return {
        "config": {
            "rate": args.rate,
            "rtt_ms": args.rtt_ms,
            "model": args.model,
            "inner_steps": args.inner_steps,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "exchange_timeout": args.exchange_timeout,
            "join_after": args.join_after,
            "tbf": "rate R burst 64kb latency 100ms on each peer's egress (the joiner's too)",
            "delay": "a userspace switch in the hub holds each frame RTT/2 (this kernel has no netem)",
            "run_dir": str(run_dir),
            "this_tree": label,
        },
        "configs": configs,
        "ratios": ratios(configs, label),
        "load_average_now": load_average(),
        "note": "2 shared CPU cores (other benchmarks may run): seconds are noisy; see each config's loads",
    }


# ---------------------------------------------------------------------------------------- output


def _say(text: str) -> None:
    print(text, flush=True)


def _mb(value: int) -> str:
    return f"{value / 1e6:.1f}"


def row_text(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['label']:<14} {r['config']:<7} error: {r['error']}"
    sources = " ".join(f"{k}:{_mb(v)}" for k, v in r["sources"].items()) or "-"
    refused = "; ".join(f"{k}: {v}" for k, v in r["refused"].items()) or "-"
    ev = r["joiner_eval"] or {}
    return (
        f"{r['label']:<14} {r['config']:<7} {_num(r['fetch_s'], 7)} {_num(r['total_s'], 7)} "
        f"{_mb(r['bytes_received']):>7} {_num(r['fetch_mbit_s'], 6, 1)} {r['weights_round']!s:>5} "
        f"{_num(ev.get('loss'), 7, 3)} {_num(r['members_eval_at_weights_round_median'], 7, 3)} "
        f"{_num(r['members_latest_eval_median'], 7, 3)}  sources {sources}; refused {refused}"
    )


def _num(value: float | None, width: int, digits: int = 2) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, int | float) else f"{'-':>{width}}"


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\n{cfg['model']} at {cfg['rate']} per peer's egress, RTT {cfg['rtt_ms']} ms; joiner after round "
          f"{cfg['join_after']}; MB = 1e6 bytes")  # fmt: skip
    print(
        f"{'tree':<14} {'config':<7} {'fetch s':>7} {'total s':>7} {'MB':>7} {'Mbit/s':>6} {'round':>5} "
        f"{'j eval':>7} {'m@round':>7} {'m last':>7}"
    )
    for r in result["configs"]:
        print(row_text(r))
    for label, ratio in result["ratios"]["per_tree"].items():
        a, b = ratio["members"]
        print(f"{label}: fetch_s({b} members)/fetch_s({a}) = {ratio['fetch_s_ratio']}; "
              f"total_s ratio {ratio['total_s_ratio']}")  # fmt: skip
    for pair, ratio in result["ratios"]["vs_this_tree"].items():
        print(f"{pair}: fetch_s ratio {ratio['fetch_s_ratio']}; total_s ratio {ratio['total_s_ratio']}")
    print(
        "j eval: the joiner's first eval loss (the fetched weights); m@round: the members' median eval "
        "loss at the weights' round; m last: their latest before the joiner's (the liar left out)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.join", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results here (after every config)")
    parser.add_argument("--rate", default="10mbit", help="tbf rate on each peer's egress (10mbit)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="RTT between any two peers (50)")
    parser.add_argument("--model", default="base", help="model preset (base: 43 MB of fp32 weights)")
    parser.add_argument("--members", default="1,3", help="member counts, a comma list (1,3)")
    parser.add_argument(
        "--liar-members",
        type=int,
        default=3,
        help="honest members beside one made_up_weights member (3; 0: no such run)",
    )
    parser.add_argument(
        "--code", action="append", default=[], metavar="PATH", help="also measure another checkout's code"
    )
    parser.add_argument("--inner-steps", type=int, default=2, help="the peers' --inner-steps (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    parser.add_argument("--batch-size", type=int, default=None, help="the peers' --batch-size (theirs: 16)")
    parser.add_argument(
        "--rounds", type=int, default=10_000, help="the peers' --rounds (10000: until stopped)"
    )
    parser.add_argument("--exchange-timeout", type=float, default=300.0, help="the peers' (300 s)")
    parser.add_argument("--join-after", type=int, default=2, help="rounds every member finishes first (2)")
    parser.add_argument("--rounds-timeout", type=float, default=600.0, help="for the members' rounds (600 s)")
    parser.add_argument(
        "--weights-timeout", type=float, default=600.0, help="for the joiner's weights (600 s)"
    )
    parser.add_argument(
        "--eval-timeout", type=float, default=600.0, help="for the joiner's first eval (600 s)"
    )
    parser.add_argument("--dir", default=None, help="run directory: logs, events (default: a new one)")
    parser.add_argument("--guard-s", type=int, default=WALL_CLOCK_GUARD_S, help="wall-clock guard (3300 s)")
    args = parser.parse_args()
    try:
        args.member_counts = [int(m) for m in args.members.split(",") if m.strip()]
    except ValueError:
        raise SystemExit("bench.join: --members is a comma list of counts, e.g. 1,3") from None
    if any(not 1 <= m <= 15 for m in args.member_counts) or not 0 <= args.liar_members <= 14:
        raise SystemExit("bench.join: 1 to 15 members (the joiner takes one more namespace of 16)")
    reason = unavailable_reason()
    if reason:
        print(f"bench.join: cannot run: {reason}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-join-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    _say(f"run directory (logs): {run_dir}; load average {load_average()}")
    result = run_guarded("bench.join", args.guard_s, lambda: run(args, run_dir))
    print_table(result)
    print(f"wall {result['wall_s']} s; load average {load_average()}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
