"""Kademlia on a thousand simulated nodes: lookup success, hops and messages, with churn and liars.

    python -m bench.dht_sim --nodes 1000 [--churn 0.3] [--adversarial 0.2] --json PATH

Runs the real sans-I/O core (`dht.core`, `dht.lookup`, `dht.routing`, `dht.records`) in `dht.sim`'s
simulated network (per-node latency, 1 % loss each way, 1 s RPC timeout). Lookups are a mix of GETs of
signed values (50 %), provider lookups for run rendezvous (30 %, success = every announced peer of the run
found) and node lookups (20 %). PUTs (values and provider announcements, before the lookups) are
reported apart: success = at least one holder acknowledged, with the median number that did. The
baseline in the same run is the same network without disjoint paths (one path, plain Kademlia): the
comparison shows what S/Kademlia's paths buy, at what message cost.
Judged (issue 6): success >= 99.9 % (no churn), >= 99 % (30 % churn), >= 95 % (20 % adversarial); median
hops <= 4.
"""

import argparse
import dataclasses
import json
import signal
import sys
import time

from shoal.dht.lookup import PATHS
from shoal.dht.sim import SimConfig, Simulation

WALL_CLOCK_GUARD_S = 1500  # the whole benchmark, baseline included; a stuck run is killed, not waited on


def _run(cfg: SimConfig, paths: int) -> dict:
    t = time.perf_counter()
    out = Simulation(dataclasses.replace(cfg, paths=paths)).run()
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--churn", type=float, default=0.0)
    ap.add_argument("--adversarial", type=float, default=0.0)
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-path baseline run")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)

    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"bench.dht_sim: over {WALL_CLOCK_GUARD_S} s; killed"))
    signal.alarm(WALL_CLOCK_GUARD_S)
    cfg = SimConfig(
        nodes=args.nodes, churn=args.churn, adversarial=args.adversarial, lookups=args.lookups, seed=args.seed
    )
    res = _run(cfg, PATHS)
    base = None if args.no_baseline else _run(cfg, 1)
    print(
        f"dht_sim: {args.nodes} nodes, churn {args.churn:.0%}, adversarial {args.adversarial:.0%}, "
        f"{args.lookups} lookups (shared CPU: wall times are noisy)"
    )
    for name in ("put", "get", "providers", "node"):
        s = res[name]
        extra = f", median {s['median_replicas']} replicas acked" if name == "put" else ""
        print(
            f"  {name:9s} success {s['success']:.4f}  median hops {s['median_hops']}  "
            f"messages/lookup {s['messages_per_lookup']:.1f}  ({s['attempts']} ops{extra})"
        )
    print(
        f"  all       success {res['success']:.4f}  median hops {res['median_hops']}  "
        f"messages/lookup {res['messages_per_lookup']:.1f}  wall {res['wall_s']} s"
    )
    if base is not None:
        print(
            f"  baseline (1 path, plain Kademlia): success {base['success']:.4f}  median hops "
            f"{base['median_hops']}  messages/lookup {base['messages_per_lookup']:.1f}"
        )
        fails = [r["attempts"] - round(r["success"] * r["attempts"]) for r in (res, base)]
        print(
            f"  vs baseline: failed lookups {fails[0]} vs {fails[1]}, "
            f"messages x{res['messages_per_lookup'] / base['messages_per_lookup']:.2f}"
        )
    if args.json:
        doc = {
            "success": res["success"],
            "median_hops": res["median_hops"],
            "messages_per_lookup": res["messages_per_lookup"],
            "by_kind": {k: res[k] for k in ("put", "get", "providers", "node")},
            "config": res["config"],
            "wall_s": res["wall_s"],
            "baseline_single_path": base,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
