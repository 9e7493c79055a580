"""`python -m bench.convergence --quick --json PATH [--plot PATH.png]` (also `--sweep`, `--full`, `--smoke`).

R simulated workers on the standard-library corpus, the same tokens (R·N·B·T) for every method; prints each
method's final eval loss, its ratio to tuned fp32 DiLoCo measured in the same run, bytes each peer sends per
round and that ratio, and picks the default composition by measured loss per byte. Communication is simulated
(bytes are counted from real encoded messages); only compute takes wall-clock time. The CPU of the machine
that runs it may be shared: tok/s is recorded so that a slow run can be told from a slow method.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from bench.convergence.jobs import SYNC, job, job_init, run_method, sim_config
from bench.convergence.runs import OutOfTime
from bench.convergence.sim import Batches, initial_weights
from shoal.peer.worker.data import load_stdlib_corpus

# --quick must finish within 10 minutes on 2 idle cores (the issue); leave room for loading and the plot.
QUICK_BUDGET_S = 560
FULL_BUDGET_S = 3 * 3600
SWEEP_BUDGET_S = 2 * 3600
# The composition variants the default is chosen from (the product exchanges with one partner at a time).
COMPOSITIONS = ("gossip-sparseloco", "pair-sparseloco", "compressed-noloco")
# Run order: the reference and the candidates first, so a wall-clock guard cuts the least needed ones.
QUICK_METHODS = (
    "diloco",
    "gossip-sparseloco",
    "pair-sparseloco",
    "compressed-noloco",
    "sparseloco",
    "noloco",
    "ddp",
    "single",
)
# A variant is "as good" as the best when its loss is within this fraction; among those the fewest bytes wins.
LOSS_TOLERANCE = 0.01

SWEEP: dict[str, list[dict]] = {
    "diloco": [{"lr": v} for v in (0.2, 0.3, 0.4, 0.55, 0.7)],
    "sparseloco": [{"lr": v, "topk": k} for v in (0.7, 1.0, 1.4) for k in (64, 128)],
    "noloco": [{"lr": v} for v in (0.5, 0.7, 0.9)],
    "gossip-sparseloco": [{"lr": v} for v in (1.5, 2.5, 3.5)],
    "pair-sparseloco": [{"lr": v, "consensus_every": f} for v in (1.0, 1.5) for f in (1, 2, 8)],
    "compressed-noloco": [{"lr": v} for v in (0.5, 0.7, 0.9)],
}


def run_all(
    mode: str, jobs: int, tasks: list[tuple[int, str, dict | None]], deadline: float
) -> list[dict | None]:
    """Run tasks (seed, method, overrides) on `jobs` processes, in order of submission; prints as they end."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=job_init) as pool:
        futures = [pool.submit(job, mode, seed, name, ov, deadline) for seed, name, ov in tasks]
        for (seed, name, ov), fut in zip(tasks, futures, strict=True):
            fut.add_done_callback(
                lambda f, seed=seed, name=name, ov=ov: _report(seed, name, ov, f.result()[1])
            )
        return [f.result()[1] for f in futures]


def _report(seed: int, name: str, overrides: dict | None, res: dict | None) -> None:
    label = f"seed {seed} {name:18s}" + (f" {overrides}" if overrides else "")
    if res is None:
        print(f"  {label}: skipped, wall-clock guard reached", flush=True)
        return
    print(
        f"  {label} loss {res['eval_loss']:.4f} (avg-w {res['eval_loss_avg_weights']:.4f}) "
        f"spread {res['spread']:.5f} bits/param {res['bits_per_param']:.3f} "
        f"bytes/peer/round {res['bytes_per_peer_per_round']:.0f} {res['seconds']:.0f}s "
        f"{res['tok_per_s']:.0f} tok/s",
        flush=True,
    )


def choose_default(results: dict[str, dict]) -> str | None:
    """The composition variant that learns best per byte: lowest loss; within 1 % of it, fewest bytes."""
    done = {m: results[m] for m in COMPOSITIONS if m in results}
    if not done:
        return None
    best = min(v["eval_loss"] for v in done.values())
    close = [m for m, v in done.items() if v["eval_loss"] <= best * (1 + LOSS_TOLERANCE)]
    return min(close, key=lambda m: done[m]["bytes_per_peer_per_round"])


def summarise(results: dict[str, dict]) -> None:
    ref = results.get("diloco")
    print(
        f"{'method':20s} {'loss':>7s} {'avg-w':>7s} {'spread':>8s} {'bits/p':>7s} {'B/peer/round':>13s} "
        f"{'loss/diloco':>11s} {'bytes/diloco':>12s} {'tok/s':>7s}"
    )
    for name, v in results.items():
        lr = v["eval_loss"] / ref["eval_loss"] if ref else float("nan")
        br = v["bytes_per_peer_per_round"] / ref["bytes_per_peer_per_round"] if ref else float("nan")
        print(
            f"{name:20s} {v['eval_loss']:7.4f} {v['eval_loss_avg_weights']:7.4f} {v['spread']:8.5f} "
            f"{v['bits_per_param']:7.3f} {v['bytes_per_peer_per_round']:13.0f} {lr:11.4f} {br:12.5f} "
            f"{v['tok_per_s']:7.0f}"
        )


def average_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in per_seed[0]:
        runs = [s[name] for s in per_seed if name in s]
        merged = dict(runs[0])
        for key in (
            "eval_loss",
            "eval_loss_avg_weights",
            "spread",
            "bytes_per_peer_per_round",
            "bits_per_param",
            "seconds",
            "tok_per_s",
        ):
            merged[key] = sum(r[key] for r in runs) / len(runs)
        merged["seeds"] = len(runs)
        merged["eval_loss_per_seed"] = [r["eval_loss"] for r in runs]
        out[name] = merged
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax_tok, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, v in results.items():
        xs = [p["tokens"] for p in v["curve"]]
        ys = [p["loss"] for p in v["curve"]]
        ax_tok.plot(xs, ys, label=name)
        if v["bytes_per_peer_per_round"] > 0:
            ax_bytes.plot([max(p["bytes"], 1.0) for p in v["curve"]], ys, label=name)
    ax_tok.set(xlabel="tokens (all workers)", ylabel="held-out loss (nats/byte)", title="loss vs tokens")
    ax_bytes.set(xlabel="bytes sent per peer (cumulative)", xscale="log", title="loss vs bytes sent")
    for ax in (ax_tok, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="CI config (default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="larger model, 3 seeds")
    mode.add_argument("--sweep", action="store_const", dest="mode", const="sweep", help="tune outer lrs")
    mode.add_argument("--scaling", action="store_const", dest="mode", const="scaling", help="bytes vs peers")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="seconds-long check")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--plot", type=Path, help="write loss-vs-tokens / loss-vs-bytes plot (PNG)")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--seeds", type=int, help="number of seeds (quick 1, full 3)")
    parser.add_argument("--budget", type=float, help="wall-clock guard in seconds")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one torch thread each (default 2)")
    args = parser.parse_args(argv)
    mode_name = args.mode or "quick"
    budgets = {"full": FULL_BUDGET_S, "sweep": SWEEP_BUDGET_S, "scaling": SWEEP_BUDGET_S}
    budget = args.budget or budgets.get(mode_name, QUICK_BUDGET_S)
    seeds = args.seeds or (3 if mode_name == "full" else 1)
    start = time.time()
    deadline = start + budget
    corpus = load_stdlib_corpus()
    print(
        f"corpus: {corpus.files} files, {len(corpus.train)} train / {len(corpus.validation)} held-out bytes, "
        f"sha256 {corpus.sha256[:16]}…; {args.jobs} processes, guard {budget:.0f} s",
        flush=True,
    )
    if mode_name == "scaling":
        return scaling(args, deadline)
    if mode_name == "sweep":
        methods = tuple(args.methods.split(",")) if args.methods else tuple(SWEEP)
        tasks = [(0, name, ov) for name in methods for ov in SWEEP.get(name, [])]
        rows = run_all("sweep", args.jobs, tasks, deadline)
        table: dict[str, list[dict]] = {}
        for (_, name, ov), row in zip(tasks, rows, strict=True):
            if row is not None:
                table.setdefault(name, []).append({**(ov or {}), **row})
        best = {m: min(rows_, key=lambda r: r["eval_loss"]) for m, rows_ in table.items()}
        for m, row in best.items():
            print(f"best {m}: { ({k: row[k] for k in SWEEP[m][0]}) } loss {row['eval_loss']:.4f}")
        if args.json:
            args.json.write_text(
                json.dumps({"sweep": table, "best": best, "corpus_sha256": corpus.sha256}, indent=1)
            )
        return 0
    methods = tuple(args.methods.split(",")) if args.methods else QUICK_METHODS
    tasks = [(seed, name, None) for seed in range(seeds) for name in methods]
    rows = run_all(mode_name, args.jobs, tasks, deadline)
    per_seed: list[dict[str, dict]] = [{} for _ in range(seeds)]
    skipped = []
    for (seed, name, _), row in zip(tasks, rows, strict=True):
        if row is None:
            skipped.append(f"{name}@seed{seed}")
        else:
            per_seed[seed][name] = row
    results = average_seeds([s for s in per_seed if s]) if any(per_seed) else {}
    default = choose_default(results)
    summarise(results)
    cfg = sim_config(mode_name, 0)
    print(
        f"default (lowest loss among {', '.join(COMPOSITIONS)}; within {LOSS_TOLERANCE:.0%} of it, fewest "
        f"bytes): {default}; wall {time.time() - start:.0f} s (CPU may be shared with other jobs)"
    )
    out = {
        "methods": results,
        "default": default,
        "config": {**asdict(cfg), "model": asdict(cfg.model), "mode": mode_name, "seeds": seeds},
        "corpus_sha256": corpus.sha256,
        "skipped": skipped,
        "wall_s": time.time() - start,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"results written to {args.json}")
    if args.plot and results:
        plot(results, args.plot)
    return 0


SCALING_PEERS = (4, 8, 16, 32)


def scaling(args: argparse.Namespace, deadline: float) -> int:
    """Bytes each peer sends per round as the run grows (the CI model, a few rounds: bytes, not loss)."""
    methods = (
        tuple(args.methods.split(",")) if args.methods else tuple(m for m in QUICK_METHODS if m not in SYNC)
    )
    job_init()
    table: dict[int, dict[str, float]] = {}
    for peers in SCALING_PEERS:
        # 8 one-step rounds of batch 1: gossip reaches its steady state at R <= 32 (log2 R rounds).
        cfg = replace(
            sim_config("quick", 0),
            replicas=peers,
            batch=1,
            inner_steps=1,
            total_steps=8,
            eval_every=8,
            eval_windows=2,
        )
        batches = Batches(load_stdlib_corpus(), cfg)
        init = initial_weights(cfg)
        n_params = sum(t.numel() for t in init.values())
        table[peers] = {}
        for name in methods:
            try:
                res = run_method(name, cfg, batches, init, deadline)
            except OutOfTime:
                print(f"R={peers}: wall-clock guard reached; stopping here", flush=True)
                return _write_scaling(args, table)
            table[peers][name] = res.bytes_per_peer_per_round
        print(
            f"R={peers:3d} bits/param sent per peer per round: "
            + "  ".join(f"{m} {b * 8 / n_params:.3f}" for m, b in table[peers].items()),
            flush=True,
        )
    return _write_scaling(args, table)


def _write_scaling(args: argparse.Namespace, table: dict) -> int:
    if args.json:
        args.json.write_text(json.dumps({"bytes_per_peer_per_round": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
