"""What a daemon costs before it trains: its import time and its resident memory, beside its worker's.

Imports the daemon's modules in a fresh interpreter (`python -P -X importtime`) and, as the baseline of the
same run, torch alone (what the daemon used to import). Then starts a real 2-peer `peer swarm` on
127.0.0.1 (nano model) and samples every daemon and worker process's resident memory from /proc until the
swarm ends. Printed and written to `--json`: the daemon's import seconds against torch's, whether torch
was loaded in the daemon, and the peak RSS of each daemon and worker.

    python -m bench.footprint --json bench/out/footprint.json [--module shoal.peer.daemon] [--repeats 5]

`--module` and `--command` let the same measurement run against an older tree (for a before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWARM = [
    sys.executable,
    "-P",
    "-m",
    "shoal.peer",
    "swarm",
    "--peers",
    "2",
    "--rounds",
    "4",
    "--inner-steps",
    "5",
]


def import_seconds(code: str, repeats: int, cwd: Path) -> float:
    """Median cumulative import time of `code`'s modules, from `-X importtime` (microseconds summed)."""
    times = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            cwd=cwd,
            check=True,
        )
        total = 0
        for line in result.stderr.splitlines():
            match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
            if match and not match.group(2).startswith(" "):  # top-level imports only: cumulative times
                total += int(match.group(1))
        times.append(total / 1e6)
    return statistics.median(times)


def loads_torch(code: str, cwd: Path) -> bool:
    probe = f"{code}; import sys; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, check=True)
    return out.stdout.strip() == "True"


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in kB, (0, 0) once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return int(fields.get("VmRSS", 0)), int(fields.get("VmHWM", 0))


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def swarm_rss(command: list[str], cwd: Path) -> dict[str, list[float]]:
    """Peak RSS (MB) of each daemon (`... join ...`) and each worker (the daemon's child) of one swarm."""
    peaks: dict[int, tuple[str, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        swarm = subprocess.Popen(
            [*command, "--dir", folder],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "160"},
        )
        try:
            while swarm.poll() is None:
                for daemon in children(swarm.pid):
                    if " join " not in cmdline(daemon):
                        continue
                    workers = [w for w in children(daemon) if "peer.worker" in cmdline(w)]
                    for pid, kind in [(daemon, "daemon")] + [(w, "worker") for w in workers]:
                        _, hwm = rss_kb(pid)
                        if hwm:
                            peaks[pid] = (kind, max(hwm, peaks.get(pid, (kind, 0))[1]))
                time.sleep(0.2)
        finally:
            if swarm.poll() is None:
                swarm.terminate()
                swarm.wait(60)
    out: dict[str, list[float]] = {"daemon": [], "worker": []}
    for kind, kb in peaks.values():
        out[kind].append(round(kb / 1024, 1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--module", default="shoal.peer.daemon", help="the daemon's module to import")
    parser.add_argument("--command", help="the swarm command (default: python -P -m shoal.peer swarm ...)")
    parser.add_argument("--cwd", type=Path, default=REPO, help="where to run (an older checkout, say)")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()

    code = f"import {options.module}"
    daemon_s = import_seconds(code, options.repeats, options.cwd)
    torch_s = import_seconds("import torch", options.repeats, options.cwd)
    torch_loaded = loads_torch(code, options.cwd)
    command = options.command.split() if options.command else SWARM
    rss = swarm_rss(command, options.cwd)
    result = {
        "module": options.module,
        "daemon_import_s": round(daemon_s, 3),
        "torch_import_s": round(torch_s, 3),
        "daemon_import_over_torch": round(daemon_s / torch_s, 3),
        "daemon_loads_torch": torch_loaded,
        "daemon_peak_rss_mb": rss["daemon"],
        "worker_peak_rss_mb": rss["worker"],
    }
    print(json.dumps(result, indent=2))
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
