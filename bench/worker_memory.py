"""Where a training worker's memory goes, phase by phase, in one process.

    python -m bench.worker_memory --model gpt2-small --batch-size 2 [--rounds 3] [--threads 2]
        [--overlap off|memory|spill] [--json PATH]

Builds the worker's `Trainer` on a small generated corpus and runs `--rounds` rounds' phases in the order the
worker runs them (peer/worker/process.py): the inner steps, the round's message, the outer step against a
partner's message (another replica's θ: the guard decodes, probes and judges it, then the step pulls toward
it; in the last round the pull is clipped to half, the guard's down-weighting of a suspect partner), the
round's checkpoint (its optimizer state in a file of its own, then the rest, written in the background while
the next phases run, as the worker does), the snapshot for joiners and the evaluation; with `--overlap`, in
`peer join --overlap`'s order (the step alone, the next round's inner steps, then the round's real step,
"settle"). Before each phase the peak resident set (`VmHWM`) is reset through /proc/self/clear_refs; after
it the peak is read. Each phase's peak is given in MB and in models above the baseline measured in the same
process before the model was built (the interpreter and torch), so that it compares with the issue's
target: the training footprint
(weights, gradients, two AdamW moments, φ, outer momentum: 6 models) plus one model of scratch. The first
round allocates AdamW's moments and the outer momentum for the first time; the rounds after it are what a
long run repeats. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peer_runs import write_json

FOOTPRINT_MODELS = 6  # weights, gradients, two AdamW moments, φ, outer momentum
TARGET_MODELS = FOOTPRINT_MODELS + 1  # plus one model of scratch


def status_mb() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def partner_message(trainer: Any, number: int) -> bytes:
    """Another replica's message for this round: this peer's θ moved by seeded noise of about the size of
    its own update (a replica that trained on other data), encoded against this peer's φ as a partner's is."""
    import torch

    from shoal.gossip.outer.methods import make_message

    generator = torch.Generator().manual_seed(number)
    fast = {}
    for name, theta in trainer.fast().items():
        update = theta - trainer.outer.slow[name]
        noise = torch.randn(theta.shape, generator=generator) * update.std().clamp_min(1e-8)
        fast[name] = theta + 0.5 * noise
    return make_message(trainer.outer_config, trainer.outer, fast)


def clipped(trainer: Any, step: Callable[[], Any]) -> Any:
    """`step` (the worker's outer step) with the guard's verdict forced to a clip at half weight."""
    from shoal.gossip.outer.guard import CLIP, Verdict

    judge = trainer._judge

    def half(*args: Any) -> Verdict:
        verdict = judge(*args)
        return Verdict(CLIP, 0.5, "forced by bench.worker_memory", verdict.scores)

    trainer._judge = half
    try:
        return step()
    finally:
        del trainer._judge


def corpus(directory: Path) -> Path:
    """A text file large enough for the model's windows (bytes are the tokens)."""
    path = directory / "corpus.txt"
    path.write_text(("the quick brown fox jumps over the lazy dog; " * 200 + "\n") * 400)
    return path


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import torch

    from shoal.peer.worker import overlap
    from shoal.peer.worker.checkpoints import CheckpointWriter
    from shoal.peer.worker.memory import release_free_memory
    from shoal.peer.worker.snapshots import write_snapshot
    from shoal.peer.worker.train import Trainer, TrainSettings

    torch.set_num_threads(args.threads)
    baseline = status_mb()["VmRSS"]  # the interpreter and torch, before any model
    settings = TrainSettings(
        model=args.model, inner_steps=args.inner_steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=2,
        total_steps=100, weight_decay=0.1, eval_windows=None, seed=0, threads=args.threads,
        method="default", data=str(corpus(directory)), rounds=None, shard=[0, 1], init_seed=7, data_seed=7,
        peer_id="peer-a", overlap="off", activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    phases: list[dict[str, Any]] = []
    model_mb = 0.0

    def phase(name: str, run: Any, number: int = 0) -> Any:
        reset_peak()
        start = status_mb()["VmRSS"]
        began = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - began
        peak = status_mb()["VmHWM"]
        row = {"phase": name, "round": number, "seconds": round(seconds, 2), "start_mb": round(start),
               "peak_mb": round(peak)}  # fmt: skip
        phases.append(row)
        if model_mb:
            show(row)
        return result

    def show(row: dict[str, Any]) -> None:
        row["peak_models_above_baseline"] = round((row["peak_mb"] - baseline) / model_mb, 2)
        models, seconds = row["peak_models_above_baseline"], row["seconds"]
        print(f"round {row['round']} {row['phase']:19s} peak {row['peak_mb']:6d} MB  {models:5.2f} models  "
              f"({seconds:.1f} s)", flush=True)  # fmt: skip

    trainer = phase("build", lambda: Trainer(settings))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    model_mb = 4 * parameters / 2**20
    show(phases[0])
    writer = CheckpointWriter(directory / "checkpoint.pt")

    def run_round(number: int) -> None:
        own = phase("message", trainer.message, number)
        partner = partner_message(trainer, number)
        release_free_memory()  # the bench's own copy of θ, made for the partner's message
        optimizer_file = writer.write_optimizer(trainer.optimizer.state_dict())
        writer.wait()  # the worker writes it while the daemon swaps the round
        clip = number == args.rounds and args.rounds > 1
        if args.overlap != "off":
            return overlapped(number, own, partner, optimizer_file, clip)
        step = lambda: trainer.outer_step(own, partner, "peer-b")  # noqa: E731
        name = "outer step" + (", clipped" if clip else "")
        phase(name, (lambda: clipped(trainer, step)) if clip else step, number)
        phase("checkpoint", lambda: writer.write(trainer.state_dict(optimizer_file)), number)
        after(number)

    def overlapped(number: int, own: bytes, partner: bytes, optimizer_file: str | None, clip: bool) -> None:
        """`peer join --overlap`'s order: the step alone, the next round's inner steps, then the real step."""
        spill = directory / overlap.SPILL_NAME if args.overlap == "spill" else None
        pending = phase("overlap begin", lambda: overlap.begin(trainer, own, optimizer_file, spill), number)
        for _ in range(settings.inner_steps):
            phase("inner step, overlapped", trainer.train_step, number + 1)
        step = lambda: overlap.settle(trainer, pending, number, partner, "peer-b")  # noqa: E731
        name = "settle" + (", clipped" if clip else "")
        phase(name, (lambda: clipped(trainer, step)) if clip else step, number)
        phase("checkpoint", lambda: writer.write(overlap.round_start_state(trainer, pending)), number)
        after(number)

    def after(number: int) -> None:
        phase("snapshot", lambda: write_snapshot(directory, number, trainer.slow_chunks()), number)
        phase("evaluation", trainer.evaluate, number)

    try:
        for number in range(1, args.rounds + 1):
            if number == 1 or args.overlap == "off":
                for _ in range(settings.inner_steps):
                    phase("inner step", trainer.train_step, number)
            run_round(number)
    finally:
        writer.close()
    worst = max(phases, key=lambda row: row["peak_mb"])
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "activation_checkpointing": trainer.checkpointing,
        "overlap": args.overlap,
        "parameters": parameters,
        "model_mb": round(model_mb, 1),
        "baseline_mb": round(baseline),
        "phases": phases,
        "peak_mb": worst["peak_mb"],
        "peak_phase": worst["phase"],
        "peak_round": worst["round"],
        "peak_models_above_baseline": worst["peak_models_above_baseline"],
        "target_models_above_baseline": TARGET_MODELS,
        "ratio_to_target": round(worst["peak_models_above_baseline"] / TARGET_MODELS, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="model preset (base)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per inner step (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3; the last one's pull is clipped)")
    parser.add_argument("--inner-steps", type=int, default=2, help="inner steps a round (2)")
    parser.add_argument(
        "--activation-checkpointing", choices=("auto", "on", "off"), default="auto", help="as peer join's"
    )
    parser.add_argument(
        "--overlap", choices=("off", "memory", "spill"), default="off",
        help="peer join --overlap's order: the round's saved state in memory, or spilled to disk as the "
        "worker does (off)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the result here")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        print("bench.worker_memory needs Linux's /proc/self/clear_refs", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as directory:
        result = measure(args, Path(directory))
    print(f"peak {result['peak_mb']} MB in round {result['peak_round']}'s {result['peak_phase']}: "
          f"{result['peak_models_above_baseline']} models above the {result['baseline_mb']} MB baseline; "
          f"target {TARGET_MODELS}: ratio {result['ratio_to_target']}")  # fmt: skip
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
