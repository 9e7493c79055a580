"""How long a peer takes from SIGTERM to a saved checkpoint and to its exit, in the middle of a round.

Starts one real `peer join` per try (alone in its run, so nothing else shares the cores), waits until its
worker is in the first round's inner steps (its first `progress` event) and a random further moment (up
to `--jitter` seconds, to land anywhere in an inner step), then sends SIGTERM to the daemon, as Docker,
systemd or `kill` does; Ctrl-C (SIGINT to the process group) takes the same path, the worker ignoring
SIGINT. Measured: seconds to the checkpoint's rename (its mtime) and to the daemon's exit, and the inner
steps the checkpoint kept. With a small `--inner-steps` the stop may also land in an evaluation or while a
round's checkpoint is being written in the background.

    python -m bench.stop_latency --models nano,small,base --tries 5 --json bench/out/stop-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600  # loading torch and the corpus on a loaded 2-core machine


def one_try(model: str, inner_steps: int, jitter: float, threads: int, folder: Path) -> dict[str, Any]:
    state = folder / "state"
    args = [
        sys.executable, "-P", "-m", "shoal.peer", "join", "--json-events", "--run", f"stop-{model}",
        "--listen", "127.0.0.1:0", "--model", model, "--inner-steps", str(inner_steps),
        "--threads", str(threads), "--state-dir", str(state),
    ]  # fmt: skip
    with open(folder / "peer.log", "wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=dict(os.environ))
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    progress: dict[str, Any] | None = None
    for line in process.stdout:
        event = json.loads(line) if line.startswith(b"{") else {}
        if event.get("event") == "progress":
            progress = event
            break
        if time.monotonic() > deadline:
            break
    if progress is None:
        process.kill()
        raise RuntimeError(f"no progress event from {model}; see {folder / 'peer.log'}")
    time.sleep(random.uniform(0, jitter))
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    process.stdout.read()  # the rest of its events, to its end
    code = process.wait(timeout=120)
    exited = time.time()
    checkpoint = state / "checkpoint.pt"
    import torch  # only here: the measured processes load it themselves

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {
        "model": model,
        "exit_code": code,
        "to_checkpoint_s": round(checkpoint.stat().st_mtime - sent, 3),
        "to_exit_s": round(exited - sent, 3),
        "round": saved["round"],
        "round_steps": saved["round_steps"],
        "checkpoint_mb": round(checkpoint.stat().st_size / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nano,small,base")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=1000)
    parser.add_argument("--jitter", type=float, default=3.0, help="seconds: the stop's spread after progress")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in the worker; 0: default")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    tries = []
    for model in options.models.split(","):
        for _ in range(options.tries):
            with tempfile.TemporaryDirectory(prefix="stop-latency-") as folder:
                result = one_try(model, options.inner_steps, options.jitter, options.threads, Path(folder))
            print(json.dumps(result), flush=True)
            tries.append(result)
    summary = {}
    print(f"{'model':8} {'tries':>5} {'to checkpoint s (median / max)':>32} {'to exit s (median / max)':>26}")
    for model in options.models.split(","):
        mine = [t for t in tries if t["model"] == model]
        ckpt, ends = [t["to_checkpoint_s"] for t in mine], [t["to_exit_s"] for t in mine]
        summary[model] = {
            "tries": len(mine),
            "to_checkpoint_median_s": statistics.median(ckpt),
            "to_checkpoint_max_s": max(ckpt),
            "to_exit_median_s": statistics.median(ends),
            "to_exit_max_s": max(ends),
            "all_exit_0": all(t["exit_code"] == 0 for t in mine),
        }
        print(
            f"{model:8} {len(mine):>5} {statistics.median(ckpt):>22.2f} / {max(ckpt):<7.2f}"
            f"{statistics.median(ends):>18.2f} / {max(ends):.2f}"
        )
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps({"options": vars(options) | {"json": str(options.json)},
                                            "tries": tries, "summary": summary}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
