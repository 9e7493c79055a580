"""`python -m bench.convergence --quick --json PATH [--plot PATH.png]` (also `--sweep`, `--full`, `--smoke`).

R simulated workers on the standard-library corpus, the same tokens (R·N·B·T) for every method; prints each
method's final eval loss, its ratio to tuned fp32 DiLoCo measured in the same run, bytes each peer sends per
round and that ratio. Communication is simulated (bytes are counted from real encoded messages); only compute
takes wall-clock time, and the CPU may be shared: tok/s is recorded so that a slow run can be told from a slow
method. `--peers 4,8,16` runs the mode's config at each R (`--scaling` is `--peers 4,8,16`) and reports
loss against DiLoCo, replica spread and the lattice code's decode statistics at each. `--methods` takes method
names, `default` (the product's DEFAULT_METHOD) and variants `NAME:KNOB=VALUE[:KNOB=VALUE]` (OuterConfig
knobs).

Every finished run is cached per (config, method, seed, code version) in bench/convergence/cache/ (see
`cache`), so results accumulate and do not depend on the machine's load. DiLoCo and the product's default are
always run; a result without either exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.convergence import cache
from bench.convergence.jobs import SYNC, job, job_init, run_key, sim_config
from shoal.gossip.outer.methods import DEFAULT_METHOD, MODULES, TUNED, OuterConfig
from shoal.peer.worker.data import load_stdlib_corpus

REFERENCE = "diloco"
# The product methods the bench's pick is made from: compositions of a pairwise exchange with a compressed
# message that the daemon can run (V-A gossip needs relays, which the daemon does not do).
PICK_FROM = ("pair-sparseloco", "compressed-noloco")
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
# --scaling: the reference, NoLoCo, the product's default and the sparse compositions.
SCALING_METHODS = ("diloco", "noloco", "default", "pair-sparseloco", "gossip-sparseloco")
SCALING_PEERS = (4, 8, 16)
# Within this fraction of DiLoCo's loss at every R counts as holding up; among those the fewest bytes wins.
LOSS_TOLERANCE = 0.01

SWEEP: dict[str, list[dict]] = {
    "diloco": [{"lr": v} for v in (0.2, 0.3, 0.4, 0.55, 0.7)],
    "sparseloco": [{"lr": v, "topk": k} for v in (0.7, 1.0, 1.4) for k in (64, 128)],
    "noloco": [{"lr": v} for v in (0.5, 0.7, 0.9)],
    "gossip-sparseloco": [{"lr": v} for v in (1.5, 2.5, 3.5)],
    "pair-sparseloco": [{"lr": v, "consensus_every": f} for v in (1.0, 1.5) for f in (1, 2, 8)],
    "compressed-noloco": [{"lr": v} for v in (0.5, 0.7, 0.9)],
}


@dataclass(frozen=True)
class Spec:
    """One method to run: its label in the results, the registered method and OuterConfig overrides."""

    label: str
    method: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)  # the label names them


def parse_spec(text: str) -> Spec:
    """`default`, a method name, or `NAME:KNOB=VALUE[:KNOB=VALUE]` (values read as JSON, else strings)."""
    name, *knobs = text.strip().split(":")
    method = DEFAULT_METHOD if name == "default" else name
    if method not in MODULES and method not in SYNC:
        raise SystemExit(f"unknown method {name!r}; choose from default, {', '.join([*MODULES, *SYNC])}")
    overrides: dict = {}
    for knob in knobs:
        key, eq, raw = knob.partition("=")
        if not eq or (key not in OuterConfig.__dataclass_fields__ and key != "topk"):
            raise SystemExit(f"{text!r}: {knob!r} is not KNOB=VALUE with an OuterConfig knob")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        default = getattr(OuterConfig.__dataclass_fields__.get(key), "default", None)
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)  # `lattice_range=3` is the same setting as the tuned 3.0
        overrides[key] = value
    label = method + "".join(f":{k}={json.dumps(v)}" for k, v in overrides.items())
    return Spec(label, method, overrides)


def method_specs(text: str | None, fallback: tuple[str, ...], required: bool = True) -> list[Spec]:
    """The runs asked for, DiLoCo and the product's default first (always run unless `required` is off)."""
    specs = [parse_spec(t) for t in (text.split(",") if text else fallback)]
    if required:
        specs = [Spec(REFERENCE, REFERENCE), Spec(DEFAULT_METHOD, DEFAULT_METHOD), *specs]
    unique: dict[str, Spec] = {}
    for spec in specs:
        unique.setdefault(spec.label, spec)
    return list(unique.values())


Task = tuple[int, int, Spec]  # (R, seed, spec)


def run_all(
    mode: str, jobs: int, tasks: list[Task], budget: float | None, use_cache: bool
) -> dict[Task, dict | None]:
    """Each task's result: from the cache, else run on `jobs` processes (None: --budget ran out first).

    Tasks with the same key (a variant spelling out the default's settings) run once.
    """
    out: dict[Task, dict | None] = {}
    keys = {
        task: run_key(mode, task[1], task[2].method, task[2].overrides or None, task[0]) for task in tasks
    }
    todo: dict[str, list[Task]] = {}
    for task in tasks:
        hit = cache.load(keys[task]) if use_cache else None
        if hit is not None:
            out[task] = hit
            _report(task, hit, cached=True)
        else:
            todo.setdefault(keys[task], []).append(task)
    if not todo:
        return out
    print(
        f"{len(out)} runs from the cache, {len(todo)} to run (code version {cache.code_version()})",
        flush=True,
    )
    deadline = None if budget is None else time.time() + budget
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=job_init) as pool:
        futures: dict[str, Future] = {}
        for key, same in todo.items():
            peers, seed, spec = same[0]
            fut = pool.submit(job, mode, seed, spec.method, spec.overrides or None, peers, deadline, key)
            fut.add_done_callback(lambda f, same=same: [_report(t, f.result()) for t in same])
            futures[key] = fut
        for key, fut in futures.items():
            for task in todo[key]:
                out[task] = fut.result()
    return out


def _report(task: Task, res: dict | None, cached: bool = False) -> None:
    peers, seed, spec = task
    label = f"R={peers} seed {seed} {spec.label:24s}"
    if res is None:
        print(f"  {label}: not run, --budget reached", flush=True)
        return
    decode = res.get("decode")
    extra = ""
    if decode:
        extra = (
            f" wrapped {decode['wrap_rate']:.2e} flagged {decode['flagged_rate']:.2e} "
            f"err/signal {decode['error_signal']:.3f}"
        )
    if res.get("skipped_pairs"):
        extra += f" skipped pairs {res['skipped_pairs']}"
    print(
        f"  {label} loss {res['eval_loss']:.4f} (avg-w {res['eval_loss_avg_weights']:.4f}) "
        f"spread {res['spread']:.5f} bits/param {res['bits_per_param']:.3f} "
        f"bytes/peer/round {res['bytes_per_peer_per_round']:.0f}{extra} "
        + ("cached" if cached else f"{res['seconds']:.0f}s {res['tok_per_s']:.0f} tok/s"),
        flush=True,
    )


def _base(label: str) -> str:
    return label.split(":", 1)[0]


def pick_at(results: dict[str, dict]) -> str | None:
    """At one R: the composition with the lowest loss; among those within 1 % of it, the fewest bytes."""
    done = {m: v for m, v in results.items() if _base(m) in PICK_FROM}
    if not done:
        return None
    best = min(v["eval_loss"] for v in done.values())
    close = [m for m, v in done.items() if v["eval_loss"] <= best * (1 + LOSS_TOLERANCE)]
    return min(close, key=lambda m: done[m]["bytes_per_peer_per_round"])


def pick_across(by_peers: dict[int, dict[str, dict]]) -> str | None:
    """Across R: the composition within 1 % of DiLoCo's loss at every R run, with the fewest bytes per round
    (at the largest R; ties to the lower worst loss ratio). None when none holds at every R."""
    # In the order they were run: a tie goes to the first (the product's default comes before variants).
    candidates = list(dict.fromkeys(m for res in by_peers.values() for m in res if _base(m) in PICK_FROM))
    held = {}
    for m in candidates:
        ratios = []
        for res in by_peers.values():
            if m not in res or REFERENCE not in res:
                break
            ratios.append(res[m]["eval_loss"] / res[REFERENCE]["eval_loss"])
        else:
            if max(ratios) <= 1 + LOSS_TOLERANCE:
                held[m] = max(ratios)
    if not held:
        return None
    largest = by_peers[max(by_peers)]
    return min(held, key=lambda m: (largest[m]["bytes_per_peer_per_round"], held[m]))


def summarise(results: dict[str, dict]) -> None:
    ref = results.get(REFERENCE)
    w = max([20, *map(len, results)])
    print(
        f"{'method':{w}s} {'loss':>7s} {'avg-w':>7s} {'spread':>8s} {'bits/p':>7s} {'B/peer/round':>13s} "
        f"{'loss/diloco':>11s} {'bytes/diloco':>12s} {'wrapped':>8s} {'flagged':>8s} {'err/sig':>7s}"
    )
    for name, v in results.items():
        lr = v["eval_loss"] / ref["eval_loss"] if ref else float("nan")
        br = v["bytes_per_peer_per_round"] / ref["bytes_per_peer_per_round"] if ref else float("nan")
        d = v.get("decode")
        dec = (
            f"{d['wrap_rate']:8.2e} {d['flagged_rate']:8.2e} {d['error_signal']:7.3f}" if d else f"{'-':>26s}"
        )
        print(
            f"{name:{w}s} {v['eval_loss']:7.4f} {v['eval_loss_avg_weights']:7.4f} {v['spread']:8.5f} "
            f"{v['bits_per_param']:7.3f} {v['bytes_per_peer_per_round']:13.0f} {lr:11.4f} {br:12.5f} {dec}"
        )


def scaling_table(by_peers: dict[int, dict[str, dict]]) -> None:
    peers = sorted(by_peers)
    print("loss / DiLoCo and replica spread as the run grows (R = " + ", ".join(map(str, peers)) + "):")
    names = list(dict.fromkeys(m for r in peers for m in by_peers[r]))
    w = max([20, *map(len, names)])
    for name in names:
        cells = []
        for r in peers:
            res, ref = by_peers[r].get(name), by_peers[r].get(REFERENCE)
            if res is None or ref is None:
                cells.append(f"R={r}: -")
                continue
            d = res.get("decode")
            wrap = f" wrapped {d['wrap_rate']:.1e} flagged {d['flagged_rate']:.1e}" if d else ""
            cells.append(f"R={r}: {res['eval_loss'] / ref['eval_loss']:.4f} spread {res['spread']:.4f}{wrap}")
        print(f"  {name:{w}s} " + " | ".join(cells))


def average_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    names = list(dict.fromkeys(m for s in per_seed for m in s))
    for name in names:
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
        if runs[0].get("decode"):
            merged["decode"] = {k: sum(r["decode"][k] for r in runs) / len(runs) for k in runs[0]["decode"]}
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
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="seconds-long check")
    parser.add_argument(
        "--scaling", action="store_true", help="loss, spread and bytes at R = 4, 8, 16 (--peers 4,8,16)"
    )
    parser.add_argument("--peers", help="R, or comma-separated Rs (default: the mode's R)")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--plot", type=Path, help="write loss-vs-tokens / loss-vs-bytes plot (PNG)")
    parser.add_argument("--methods", help="comma-separated: names, `default`, NAME:KNOB=VALUE variants")
    parser.add_argument("--seeds", type=int, help="number of seeds (quick 1, full 3)")
    parser.add_argument(
        "--budget", type=float, help="stop runs after this many seconds (they are not cached)"
    )
    parser.add_argument("--no-cache", action="store_true", help="run everything again (results still stored)")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one torch thread each (default 2)")
    args = parser.parse_args(argv)
    mode_name = args.mode or "quick"
    seeds = args.seeds or (3 if mode_name == "full" else 1)
    if args.peers:
        peers = [int(p) for p in args.peers.split(",")]
    elif args.scaling:
        peers = list(SCALING_PEERS)
    else:
        peers = [sim_config(mode_name, 0).replicas]
    if any(p < 1 for p in peers):
        raise SystemExit("--peers must be >= 1")
    start = time.time()
    corpus = load_stdlib_corpus()
    print(
        f"corpus: {corpus.files} files, {len(corpus.train)} train / {len(corpus.validation)} held-out bytes, "
        f"sha256 {corpus.sha256[:16]}…; {args.jobs} processes; R = {', '.join(map(str, peers))}; "
        f"code version {cache.code_version()}",
        flush=True,
    )
    if mode_name == "sweep":
        return sweep(args, peers[0], corpus.sha256)
    fallback = SCALING_METHODS if args.scaling else QUICK_METHODS
    specs = method_specs(args.methods, fallback)
    tasks = [(r, seed, spec) for r in peers for seed in range(seeds) for spec in specs]
    rows = run_all(mode_name, args.jobs, tasks, args.budget, not args.no_cache)
    by_peers: dict[int, dict[str, dict]] = {}
    not_run = []
    for r in peers:
        per_seed: list[dict[str, dict]] = [{} for _ in range(seeds)]
        for (rr, seed, spec), row in rows.items():
            if rr != r:
                continue
            if row is None:
                not_run.append(f"{spec.label}@R{r}/seed{seed}")
            else:
                per_seed[seed][spec.label] = row
        by_peers[r] = average_seeds([s for s in per_seed if s]) if any(per_seed) else {}
    for r in peers:
        print(f"R = {r}:")
        summarise(by_peers[r])
        print(
            f"  bench pick at R = {r} (lowest loss of {', '.join(PICK_FROM)}; within {LOSS_TOLERANCE:.0%} "
            f"of it, fewest bytes): {pick_at(by_peers[r])}"
        )
    across = pick_across(by_peers)
    if len(peers) > 1:
        scaling_table(by_peers)
        print(
            f"bench pick across R (within {LOSS_TOLERANCE:.0%} of DiLoCo at every R, fewest bytes): {across}"
        )
    print(
        f"product default (DEFAULT_METHOD): {DEFAULT_METHOD} {TUNED[DEFAULT_METHOD]}; "
        f"wall {time.time() - start:.0f} s"
    )
    cfg = sim_config(mode_name, 0, peers[0])
    out: dict = {
        "default": DEFAULT_METHOD,
        "default_settings": TUNED[DEFAULT_METHOD],
        "bench_pick": across if len(peers) > 1 else pick_at(by_peers[peers[0]]),
        "bench_pick_rule": (
            f"within {LOSS_TOLERANCE:.0%} of DiLoCo at every R, fewest bytes"
            if len(peers) > 1
            else f"lowest loss of {', '.join(PICK_FROM)}; within {LOSS_TOLERANCE:.0%} of it, fewest bytes"
        ),
        "peers": peers,
        "by_peers": {str(r): {"methods": res, "bench_pick": pick_at(res)} for r, res in by_peers.items()},
        "config": {**asdict(cfg), "model": asdict(cfg.model), "mode": mode_name, "seeds": seeds},
        "corpus_sha256": corpus.sha256,
        "code_version": cache.code_version(),
        "not_run": not_run,
        "wall_s": time.time() - start,
    }
    if len(peers) == 1:
        out["methods"] = by_peers[peers[0]]
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"results written to {args.json}")
    if args.plot:
        for r in peers:
            path = args.plot if len(peers) == 1 else args.plot.with_stem(f"{args.plot.stem}-R{r}")
            if by_peers[r]:
                plot(by_peers[r], path)
    missing = [
        f"{name} at R = {r}" for r in peers for name in (REFERENCE, DEFAULT_METHOD) if name not in by_peers[r]
    ]
    if missing:
        print(
            f"error: no result for {', '.join(missing)}: the comparison needs DiLoCo and the product's "
            f"default (DEFAULT_METHOD = {DEFAULT_METHOD}); run again without --budget (finished runs are "
            "cached)",
            file=sys.stderr,
        )
        return 1
    return 0


def sweep(args: argparse.Namespace, peers: int, corpus_sha256: str) -> int:
    """Every method's SWEEP values at one R, seed 0; the best of each by loss."""
    methods = tuple(args.methods.split(",")) if args.methods else tuple(SWEEP)
    specs = [Spec(f"{m} {ov}", m, ov) for m in methods for ov in SWEEP.get(m, [])]
    tasks = [(peers, 0, spec) for spec in specs]
    rows = run_all("sweep", args.jobs, tasks, args.budget, not args.no_cache)
    table: dict[str, list[dict]] = {}
    for (_, _, spec), row in rows.items():
        if row is not None:
            table.setdefault(spec.method, []).append({**spec.overrides, **row})
    best = {m: min(rows_, key=lambda r: r["eval_loss"]) for m, rows_ in table.items()}
    for m, row in best.items():
        print(f"best {m}: { ({k: row[k] for k in SWEEP[m][0]}) } loss {row['eval_loss']:.4f}")
    if args.json:
        args.json.write_text(
            json.dumps({"sweep": table, "best": best, "corpus_sha256": corpus_sha256}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
