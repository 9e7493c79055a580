"""`python -m bench.worker_memory` runs a worker's round phase by phase and reports each phase's peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_the_benchmark_reports_every_phase_against_the_target(tmp_path):
    out = tmp_path / "memory.json"
    command = [
        sys.executable,
        "-m",
        "bench.worker_memory",
        "--model",
        "nano",
        "--batch-size",
        "4",
        "--json",
        str(out),
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    names = [(row["round"], row["phase"]) for row in result["phases"]]
    one_round = ["inner step", "inner step", "message", "outer step", "checkpoint", "snapshot", "evaluation"]
    clipped = [name.replace("outer step", "outer step, clipped") for name in one_round]
    assert names == [(0, "build")] + [(number, name) for number, phases in ((1, one_round), (2, one_round),
                                     (3, clipped)) for name in phases]  # fmt: skip
    assert all(row["peak_mb"] >= result["baseline_mb"] for row in result["phases"])
    assert result["peak_mb"] == max(row["peak_mb"] for row in result["phases"])
    assert result["target_models_above_baseline"] == 7 and result["ratio_to_target"] > 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_with_overlap_the_next_rounds_steps_run_between_the_step_alone_and_the_settling_step(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "bench.worker_memory", "--model", "nano", "--batch-size", "4",
               "--overlap", "spill", "--json", str(out)]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    names = [(row["round"], row["phase"]) for row in result["phases"]]
    settling = ["message", "overlap begin", "inner step, overlapped", "inner step, overlapped", "settle",
                "checkpoint", "snapshot", "evaluation"]  # fmt: skip
    rounds = [(1, settling), (2, settling), (3, [n.replace("settle", "settle, clipped") for n in settling])]
    expected = [(0, "build"), (1, "inner step"), (1, "inner step")]
    for number, phases in rounds:
        # the overlapped inner steps are the next round's
        expected += [(number + (name == "inner step, overlapped"), name) for name in phases]
    assert names == expected and result["overlap"] == "spill"
