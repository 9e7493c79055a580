"""`python -m bench.byzantine_live --json PATH`: the live half of the Byzantine benchmark (issue 18).

A real `peer swarm` of R peers on this machine (separate daemon and worker processes, the default method and
the partner guard as shipped) with one hostile peer playing each attack through the test-only `--behave`
option, against an all-honest swarm of the same size, model and schedule. Per attack: the honest peers'
mean final eval loss over the all-honest swarm's (the same peer indices), the first round an honest peer's
guard refused or clipped the attacker, the first round the run excluded it (published evidence from a
quorum of members), and the honest peers that honest guards refused or that the run excluded (false
positives). Live runs are not deterministic (pairing skips, timing), so `--honest-repeats` runs the
all-honest swarm more than once: the spread of its losses is the noise floor the ratios are read against.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTACKS = ("scale", "sign_flip", "noise", "replay", "stale", "copy", "lie", "free_rider", "other_data")
# The hostile peer is the last one: not the run's creator (peer 0), which is special for bootstrap and the run
# document.


def run_swarm(args: argparse.Namespace, attack: str | None, tag: str, workdir: Path) -> dict:
    """One swarm; its summary JSON (per peer: losses, rounds, guard verdicts and exclusions)."""
    out = workdir / f"{tag}.json"
    command = [
        sys.executable, "-P", "-m", "shoal.peer", "swarm", "--peers", str(args.peers), "--run", f"byz-{tag}",
        "--rounds", str(args.rounds), "--inner-steps", str(args.inner_steps), "--model", args.model,
        "--threads", "1", "--json", str(out), "--dir", str(workdir / tag),
    ]  # fmt: skip
    if attack is not None:
        command += ["--behave", f"{args.peers - 1}:{attack}"]
    env = {**os.environ, "SHOAL_IDENTITY_BITS": str(args.identity_bits), "COLUMNS": "160"}
    started = time.monotonic()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
    if not out.exists():
        raise SystemExit(f"swarm {tag} wrote no summary (exit {done.returncode}): {done.stderr[-2000:]!r}")
    summary = json.loads(out.read_text())
    summary["seconds"] = time.monotonic() - started
    summary["exit_code"] = done.returncode
    return summary


def hostile_index(summary: dict) -> int:
    return len(summary["per_peer"]) - 1


def honest_loss(summary: dict, hostile: int | None) -> float:
    losses = [p["eval_loss_end"] for i, p in enumerate(summary["per_peer"]) if i != hostile]
    return statistics.mean(v for v in losses if v is not None)


def judge(summary: dict, attack: str | None, baseline: float) -> dict:
    hostile = hostile_index(summary) if attack is not None else None
    peers = summary["per_peer"]
    attacker = peers[hostile]["peer"] if hostile is not None else None
    honest = [p for i, p in enumerate(peers) if i != hostile]
    honest_ids = {p["peer"] for p in honest}
    flagged_rounds = []
    refused = clipped = false_refused = false_clipped = 0
    # Why honest guards refused or clipped honest partners ("refuse: outlier-probe": n): an outlier run
    # explains itself from the JSON alone (the swarms' logs are in a temporary folder unless --dir).
    false_reasons: collections.Counter[str] = collections.Counter()
    for p in honest:
        guard = p.get("guard", {})
        refused += guard.get("refused", {}).get(attacker, 0)
        clipped += guard.get("clipped", {}).get(attacker, 0)
        false_refused += sum(n for peer, n in guard.get("refused", {}).items() if peer in honest_ids)
        false_clipped += sum(n for peer, n in guard.get("clipped", {}).items() if peer in honest_ids)
        flagged_rounds += [r for peer, r in guard.get("first_flagged", {}).items() if peer == attacker]
        for peer, reasons in guard.get("reasons", {}).items():
            if peer in honest_ids:
                false_reasons.update(reasons)
    excluded_rounds = [p["guard"]["excluded"][attacker] for p in honest if attacker in p["guard"]["excluded"]]
    false_exclusions = sorted({x for p in honest for x in p["guard"]["excluded"] if x in honest_ids})
    loss = honest_loss(summary, hostile)
    return {
        "honest_eval_loss": loss,
        "loss_ratio_vs_honest": loss / baseline,
        "attacker_refused": refused,
        "attacker_clipped": clipped,
        "detected_round": min(flagged_rounds) if flagged_rounds else None,
        "excluded_round": min(excluded_rounds) if excluded_rounds else None,
        "excluded_by": len(excluded_rounds),
        "false_refusals": false_refused,
        "false_clips": false_clipped,
        "false_reasons": dict(false_reasons),
        "false_exclusions": false_exclusions,
        "rounds_swapped_honest": sum(p["rounds_swapped"] for p in honest),
        "rounds_done_honest": sum(p["rounds_done"] for p in honest),
        "wall_s": round(summary["seconds"], 1),
        "exit_code": summary["exit_code"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.byzantine_live", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--attacks", help=f"comma-separated, of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--honest-repeats", type=int, default=2, help="all-honest swarms (the noise floor)")
    parser.add_argument("--identity-bits", type=int, default=8, help="identity work per peer (speed)")
    parser.add_argument("--dir", type=Path, help="keep the swarms' logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    attacks = args.attacks.split(",") if args.attacks else list(ATTACKS)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="byzantine-live-") as scratch:
        workdir = args.dir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        honest_runs = []
        for repeat in range(args.honest_repeats):
            honest_runs.append(run_swarm(args, None, f"honest-{repeat}", workdir))
            print(f"all honest #{repeat}: {honest_loss(honest_runs[-1], None):.4f}", flush=True)
        # The baseline: the honest swarms' peers at the indices the attack runs keep honest.
        baseline = statistics.mean(honest_loss(s, hostile_index(s)) for s in honest_runs)
        rows = {"honest": [judge(s, None, baseline) for s in honest_runs]}
        for attack in attacks:
            rows[attack] = judge(run_swarm(args, attack, attack, workdir), attack, baseline)
            r = rows[attack]
            print(
                f"{attack:11s} loss x{r['loss_ratio_vs_honest']:.4f}  refused {r['attacker_refused']:3d} "
                f"clipped {r['attacker_clipped']:3d}  detected {r['detected_round']}  excluded "
                f"{r['excluded_round']} (by {r['excluded_by']})  false refusals {r['false_refusals']} "
                f"clips {r['false_clips']} exclusions {len(r['false_exclusions'])}  {r['wall_s']:.0f} s",
                flush=True,
            )
    noise = [honest_loss(s, hostile_index(s)) / baseline for s in honest_runs]
    result = {
        "attacks": {a: rows[a] for a in attacks},
        "honest": rows["honest"],
        "honest_noise_ratios": noise,
        "baseline_honest_eval_loss": baseline,
        "config": {k: getattr(args, k) for k in ("peers", "rounds", "inner_steps", "model", "identity_bits")},
        "hostile_index": args.peers - 1,
        "wall_s": round(time.time() - start, 1),
    }
    print(f"all-honest noise (ratio of each honest swarm to their mean): {[round(x, 4) for x in noise]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
