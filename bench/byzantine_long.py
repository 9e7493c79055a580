"""`python -m bench.byzantine_long --rounds 500 --json PATH`: the guard over a long all-honest run (issue 18).

The issue asks that 0 honest peers be excluded over 500 honest rounds. This runs the Byzantine benchmark's
simulation (`bench.byzantine_run.run_byzantine`: the `--quick` model, R = 8 peers, the default method) with
every peer honest and guarded for `--rounds` outer rounds (the schedule stretched to that many rounds of
H = 12 inner steps), and, in a second process at the same time, the same run unguarded: the guard's cost
is the ratio of the two final losses. Reported: every honest verdict's action (accepted, clipped, refused),
the peers each guard excluded locally, the accusations and strikes a live run would publish, the run's
exclusions the run state's rule draws from them round by round (excluded peers leave the pairing), and
the loss curves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from bench.byzantine_run import run_byzantine
from bench.convergence.jobs import job_init, outer_config, sim_config
from bench.convergence.sim import Batches, initial_weights
from shoal.gossip.outer.guard import GuardConfig
from shoal.gossip.outer.methods import DEFAULT_METHOD
from shoal.gossip.runstate.evidence import quorum
from shoal.peer.worker.data import load_stdlib_corpus

PEERS = 8


def one_run(rounds: int, guarded: bool, seed: int) -> dict:
    base = sim_config("quick", seed, PEERS)
    cfg = replace(base, total_steps=rounds * base.inner_steps, eval_every=max(1, rounds // 25))
    batches = Batches(load_stdlib_corpus(), cfg)
    outer = outer_config(DEFAULT_METHOD)
    assert outer is not None  # the default is a product method, which has an outer config
    result = run_byzantine(cfg, batches, initial_weights(cfg), outer, None, guarded)
    result["config"] = {**asdict(cfg), "model": asdict(cfg.model)}
    return result


def summarise(guarded: dict, unguarded: dict | None, rounds: int) -> dict:
    verdicts = guarded["exchanges"]
    actions = Counter(e["action"] for e in verdicts)
    reasons = Counter(f"{e['action']}:{e['reason']}" for e in verdicts if e["action"] != "accept")
    by_round: Counter[int] = Counter(
        e["round"] // max(1, rounds // 10) for e in verdicts if e["action"] != "accept"
    )
    # A local exclusion is what a live peer publishes as evidence.
    evidence: dict[bytes, dict[bytes, dict]] = {}
    for x in guarded["excluded"]:
        accuser, accused = str(x["receiver"]).encode(), str(x["origin"]).encode()
        evidence.setdefault(accused, {})[accuser] = {"round": x["round"], "why": "guard"}
    member_rounds = [rounds] * PEERS
    out = {
        "rounds": rounds,
        "peers": PEERS,
        "verdicts": len(verdicts),
        "accepted": actions.get("accept", 0),
        "clipped": actions.get("clip", 0),
        "refused": actions.get("refuse", 0),
        "flag_reasons": dict(reasons.most_common()),
        "flags_per_tenth_of_the_run": [by_round.get(i, 0) for i in range(10)],
        "local_exclusions": guarded["excluded"],
        "accused_by": {k.decode(): sorted(a.decode() for a in by) for k, by in evidence.items()},
        "quorum": quorum(member_rounds),
        "strikes": sum(bool(e.get("strike")) for e in verdicts),
        # The run's exclusions as they happened, round by round (strikes and local exclusions published as
        # live peers publish them, `run_exclusions`' rule): origin -> the round it was excluded.
        "run_exclusions": guarded["run_excluded"],
        "loss_guarded": guarded["honest_loss"],
        "curve_guarded": guarded["curve"],
        "seconds_guarded": guarded["seconds"],
    }
    if unguarded is not None:
        out.update(
            {
                "loss_unguarded": unguarded["honest_loss"],
                "guard_cost_ratio": guarded["honest_loss"] / unguarded["honest_loss"],
                "curve_unguarded": unguarded["curve"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.byzantine_long", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--no-unguarded", action="store_true", help="skip the unguarded run (the guard's cost)"
    )
    args = parser.parse_args(argv)
    start = time.time()
    with ProcessPoolExecutor(max_workers=1 if args.no_unguarded else 2, initializer=job_init) as pool:
        guarded = pool.submit(one_run, args.rounds, True, args.seed)
        unguarded = None if args.no_unguarded else pool.submit(one_run, args.rounds, False, args.seed)
        result = summarise(guarded.result(), unguarded.result() if unguarded else None, args.rounds)
    result.update({"guard": asdict(GuardConfig()), "method": DEFAULT_METHOD, "wall_s": time.time() - start})
    print(
        f"{args.rounds} rounds, {PEERS} honest peers: {result['verdicts']} verdicts, "
        f"{result['clipped']} clipped, {result['refused']} refused; local exclusions "
        f"{len(result['local_exclusions'])}, run exclusions {len(result['run_exclusions'])} "
        f"(quorum {result['quorum']})"
    )
    print(f"flags: {result['flag_reasons']}; per tenth of the run: {result['flags_per_tenth_of_the_run']}")
    if "guard_cost_ratio" in result:
        print(
            f"loss guarded {result['loss_guarded']:.4f}, unguarded {result['loss_unguarded']:.4f} "
            f"(x{result['guard_cost_ratio']:.4f}); wall {result['wall_s']:.0f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
