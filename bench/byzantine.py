"""`python -m bench.byzantine --json PATH [--jobs 2] [--attacks a,b] [--peers R]`: 1 hostile peer of R.

Issue 18. The convergence simulation (`bench.convergence`, `--quick` config, R = 8 unless `--peers`, the
default method compressed-noloco) with replica 0 running each attack of `gossip.outer.byzantine`, with and
without the partner guard (`gossip.outer.guard`), against the all-honest run (with and without the guard)
on the same tokens. Per attack: the honest peers' mean held-out loss at the end over the same peers' loss
in the all-honest unguarded run (guarded and unguarded), the first round an honest receiver refused or
clipped the attacker's message, the round the run excluded it (the run state's rule on the strikes and
local exclusions the honest guards publish; excluded peers leave the pairing), and the honest messages the
guard refused or clipped. The false-positive figure counts every honest receiver's verdict on an honest
partner over all guarded runs (the all-honest run and the honest pairs of the attack runs). Runs are cached
in bench/convergence/cache/ (keyed by config, attack, guard, data and code version): an interrupted
benchmark resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.byzantine_run import run_byzantine
from bench.convergence import cache
from bench.convergence.jobs import job_init, outer_config, run_data
from bench.convergence.runs import OutOfTime
from shoal.gossip.outer.byzantine import ATTACKS
from shoal.gossip.outer.guard import ACCEPT, CLIP, REFUSE, GuardConfig
from shoal.gossip.outer.methods import DEFAULT_METHOD

PEERS = 8
ATTACKER = 0
LOSS_TARGET = 1.01  # the issue: 1 Byzantine peer of 8 costs <= 1 % eval loss
DETECT_WITHIN = 20  # rounds
# Attacks that cannot act in their first rounds: nothing old enough to replay, no partner yet to copy.
FIRST_ACTIVE = {"replay": 8, "stale": 8, "copy": 1}
# What a run executes: a guarded run also the guard. Not `cache.code_version`, which hashes every
# gossip/outer file: tuning the guard would throw away the unguarded runs, which do not use it.
RUN_FILES = (
    "gossip/outer/[!g]*.py",
    "bench/byzantine_run.py",
    "bench/convergence/sim.py",
    "peer/worker/model.py",
    "peer/worker/data.py",
)
GUARD_FILES = ("gossip/outer/guard.py", "gossip/runstate/evidence.py", "gossip/runstate/limits.py")


def code_digest(guarded: bool) -> str:
    h = hashlib.sha256(f"torch {torch.__version__} numpy {np.__version__}".encode())
    for pattern in RUN_FILES + (GUARD_FILES if guarded else ()):
        for path in sorted(cache.ROOT.glob(pattern)):
            h.update(f"\0{path.relative_to(cache.ROOT)}\0".encode() + path.read_bytes())
    if guarded:
        h.update(json.dumps(asdict(GuardConfig()), sort_keys=True).encode())
    return h.hexdigest()[:16]


def key_of(mode: str, peers: int, attack: str | None, guarded: bool) -> str:
    cfg, _, _, data = run_data(mode, 0, peers)
    what = {
        "config": {**asdict(cfg), "model": asdict(cfg.model)},
        "bench": "byzantine",
        "attack": attack,
        "guarded": guarded,
        "attacker": ATTACKER,
        "settings": asdict(outer_config(DEFAULT_METHOD)),
        "data": data,
        "code": code_digest(guarded),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def job(
    mode: str, peers: int, attack: str | None, guarded: bool, key: str, deadline: float | None
) -> dict | None:
    cfg, batches, init, _ = run_data(mode, 0, peers)
    try:
        res = run_byzantine(
            cfg, batches, init, outer_config(DEFAULT_METHOD), attack, guarded, ATTACKER, None, deadline
        )
    except OutOfTime:
        return None
    cache.store(key, res, {"bench": "byzantine", "mode": mode, "attack": attack, "guarded": guarded})
    return res


Run = tuple[str | None, bool]  # (attack or None for all-honest, guarded)


def run_all(
    mode: str, peers: int, runs: list[Run], jobs: int, budget: float | None, use_cache: bool
) -> dict[Run, dict]:
    out: dict[Run, dict] = {}
    todo: dict[Run, str] = {}
    for run in runs:
        key = key_of(mode, peers, *run)
        hit = cache.load(key) if use_cache else None
        if hit is not None:
            out[run] = hit
            _report(run, hit, cached=True)
        else:
            todo[run] = key
    print(f"{len(out)} runs from the cache, {len(todo)} to run", flush=True)
    deadline = None if budget is None else time.time() + budget
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=job_init) as pool:
            futures = {run: pool.submit(job, mode, peers, *run, key, deadline) for run, key in todo.items()}
            for run, fut in futures.items():
                fut.add_done_callback(lambda f, run=run: _report(run, f.result()))
            for run, fut in futures.items():
                res = fut.result()
                if res is not None:
                    out[run] = res
    return out


def _report(run: Run, res: dict | None, cached: bool = False) -> None:
    name = f"{run[0] or 'honest'} {'guarded' if run[1] else 'unguarded'}"
    if res is None:
        print(f"  {name:28s} not run: --budget reached", flush=True)
        return
    flagged = sum(e["action"] != ACCEPT for e in res["exchanges"] if not e["hostile"])
    print(
        f"  {name:28s} honest loss {res['honest_loss']:.4f} honest flagged {flagged} "
        + ("cached" if cached else f"{res['seconds']:.0f} s"),
        flush=True,
    )


def _same_peers(res: dict, attacker: int | None) -> float:
    kept = [v for i, v in enumerate(res["losses"]) if i != attacker]
    return sum(kept) / len(kept)


def _flags(exchanges: list[dict]) -> dict:
    honest = [e for e in exchanges if not e["hostile"]]
    refused = sum(e["action"] == REFUSE for e in honest)
    clipped = sum(e["action"] == CLIP for e in honest)
    reasons: dict[str, int] = {}
    for e in honest:
        if e["action"] != ACCEPT:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    return {"refused": refused, "clipped": clipped, "of": len(honest), "reasons": reasons}


def _detection(exchanges: list[dict]) -> dict:
    hostile = [e for e in exchanges if e["hostile"]]
    flagged = [e for e in hostile if e["action"] != ACCEPT]
    reasons: dict[str, int] = {}
    for e in flagged:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    return {
        "detected_round": min((e["round"] for e in flagged), default=None),
        "attacker_exchanges": len(hostile),
        "attacker_refused": sum(e["action"] == REFUSE for e in hostile),
        "attacker_clipped": sum(e["action"] == CLIP for e in hostile),
        "mean_weight": sum(e["weight"] for e in hostile) / max(1, len(hostile)),
        "reasons": reasons,
    }


def summarise(results: dict[Run, dict], attacks: list[str]) -> dict:
    base = results.get((None, False))
    base_guarded = results.get((None, True))
    out: dict = {"attacks": {}}
    for name in attacks:
        guarded, unguarded = results.get((name, True)), results.get((name, False))
        if base is None or guarded is None or unguarded is None:
            out["attacks"][name] = None
            continue
        ref = _same_peers(base, ATTACKER)
        det = _detection(guarded["exchanges"])
        first = FIRST_ACTIVE.get(name, 0)
        active = [e for e in guarded["exchanges"] if e["hostile"] and e["round"] >= first]
        first_met = min((e["round"] for e in active), default=None)
        row = {
            "loss_ratio_vs_honest": guarded["honest_loss"] / ref,
            "loss_ratio_vs_honest_unguarded": unguarded["honest_loss"] / ref,
            "loss_ratio_vs_honest_guarded": (
                guarded["honest_loss"] / _same_peers(base_guarded, ATTACKER) if base_guarded else None
            ),
            **det,
            "first_attacking_exchange": first_met,
            "detected_after_rounds": (
                None
                if det["detected_round"] is None or first_met is None
                else det["detected_round"] - first_met
            ),
            "unguarded_refused_round": _detection(unguarded["exchanges"])["detected_round"],
            "false_flags": _flags(guarded["exchanges"]),
            "excluded_by": [x for x in guarded["excluded"] if x["origin"] == f"{ATTACKER:08d}"],
            "honest_excluded": [x for x in guarded["excluded"] if x["origin"] != f"{ATTACKER:08d}"],
            "strikes": sum(bool(e.get("strike")) for e in guarded["exchanges"] if e["hostile"]),
            "run_excluded_round": guarded.get("run_excluded", {}).get(f"{ATTACKER:08d}"),
            "honest_run_excluded": {
                o: t for o, t in guarded.get("run_excluded", {}).items() if o != f"{ATTACKER:08d}"
            },
        }
        out["attacks"][name] = row
    if base is not None and base_guarded is not None:
        out["honest"] = {
            "loss_unguarded": base["honest_loss"],
            "loss_guarded": base_guarded["honest_loss"],
            "guard_cost_ratio": base_guarded["honest_loss"] / base["honest_loss"],
            "false_flags": _flags(base_guarded["exchanges"]),
            "excluded": base_guarded["excluded"],
        }
    honest_all = [e for (a, g), res in results.items() if g for e in res["exchanges"] if not e["hostile"]]
    excluded = [
        x
        for (a, g), res in results.items()
        if g
        for x in res["excluded"]
        if a is None or x["origin"] != f"{ATTACKER:08d}"
    ]
    honest_run = [
        o
        for (a, g), res in results.items()
        if g
        for o in res.get("run_excluded", {})
        if a is None or o != f"{ATTACKER:08d}"
    ]
    out["false_positives_all_guarded_runs"] = {
        **_flags(honest_all),
        "honest_exclusions": len(excluded),
        "honest_run_exclusions": len(honest_run),
        "honest_strikes": sum(bool(e.get("strike")) for e in honest_all),
        "what": "every honest receiver's verdict on an honest partner, all guarded runs (honest and attack)",
    }
    out["honest_scores"] = _percentiles(honest_all)
    return out


def _percentiles(exchanges: list[dict]) -> dict:
    out = {}
    for key in ("ratio", "cos", "probe", "wrapped"):
        values = sorted(e["scores"][key] for e in exchanges if key in e["scores"])
        if values:
            out[key] = {
                f"p{q}": values[min(len(values) - 1, int(q / 100 * len(values)))]
                for q in (0, 1, 5, 50, 95, 99, 100)
            }
    return out


def table(summary: dict) -> None:
    print(
        f"{'attack':12s} {'guarded':>8s} {'unguarded':>9s} {'detected':>8s} {'after':>5s} {'flagged':>8s} "
        f"{'weight':>6s} {'false flags':>16s} {'run excl':>8s}  reasons"
    )
    for name, row in summary["attacks"].items():
        if row is None:
            print(f"{name:12s} not run")
            continue
        ff = row["false_flags"]
        print(
            f"{name:12s} {row['loss_ratio_vs_honest']:8.4f} {row['loss_ratio_vs_honest_unguarded']:9.4f} "
            f"{row['detected_round']!s:>8s} {row['detected_after_rounds']!s:>5s} "
            f"{row['attacker_refused'] + row['attacker_clipped']:>3d}/{row['attacker_exchanges']:<4d} "
            f"{row['mean_weight']:6.2f} {ff['refused']:>4d}+{ff['clipped']:<3d}of {ff['of']:<5d} "
            f"{row['run_excluded_round']!s:>8s}  {row['reasons']}"
        )
    if "honest" in summary:
        h = summary["honest"]
        print(
            f"all honest: loss {h['loss_unguarded']:.4f} unguarded, {h['loss_guarded']:.4f} guarded "
            f"({h['guard_cost_ratio']:.4f}); false flags {h['false_flags']}"
        )
    fp = summary["false_positives_all_guarded_runs"]
    print(
        f"honest verdicts over all guarded runs: {fp['refused']} refused, {fp['clipped']} clipped "
        f"of {fp['of']}; "
        f"honest exclusions {fp['honest_exclusions']} (by the run: {fp['honest_run_exclusions']}), "
        f"honest strikes {fp['honest_strikes']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.byzantine", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--attacks", help=f"comma-separated, of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="the seconds-long config (measures nothing)")
    parser.add_argument("--peers", type=int, default=PEERS, help=f"R, one of them hostile (default {PEERS})")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one torch thread each (default 2)")
    parser.add_argument(
        "--budget", type=float, help="stop runs after this many seconds (they are not cached)"
    )
    parser.add_argument("--no-cache", action="store_true", help="run everything again")
    parser.add_argument(
        "--only", choices=("guarded", "unguarded"), help="run one half (the table needs both)"
    )
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick"
    attacks = args.attacks.split(",") if args.attacks else list(ATTACKS)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    start = time.time()
    runs: list[Run] = [(None, False), (None, True)] + [(a, g) for a in attacks for g in (True, False)]
    if args.only:
        runs = [run for run in runs if run[1] == (args.only == "guarded")]
    print(
        f"{len(runs)} runs, mode {mode}, R = {args.peers}, attacker replica {ATTACKER}, "
        f"{args.jobs} processes",
        flush=True,
    )
    results = run_all(mode, args.peers, runs, args.jobs, args.budget, not args.no_cache)
    summary = summarise(results, attacks)
    table(summary)
    cfg = run_data(mode, 0, args.peers)[0]
    summary.update(
        {
            "method": DEFAULT_METHOD,
            "mode": mode,
            "peers": args.peers,
            "attacker": ATTACKER,
            "guard": asdict(GuardConfig()),
            "config": {**asdict(cfg), "model": asdict(cfg.model)},
            "code_version": cache.code_version(),
            "wall_s": time.time() - start,
        }
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"results written to {args.json}")
    return 0 if all(summary["attacks"].values()) and "honest" in summary else 1


if __name__ == "__main__":
    raise SystemExit(main())
