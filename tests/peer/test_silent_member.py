"""A live swarm with a silent member (issue 16; the test-only `--behave N:silent`): it keeps its signed
heartbeats going but never answers a partner. The honest peers it left waiting publish it, the run
excludes it from pairing everywhere, and none of them is excluded or accused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

PEERS = 4
SILENT = PEERS - 1
ROUNDS = 30


def test_a_silent_member_is_excluded_by_the_run_and_the_others_go_on(tmp_path):
    summary_path = tmp_path / "summary.json"
    command = [
        sys.executable, "-P", "-m", "shoal.peer", "swarm", "--peers", str(PEERS), "--run", "silence",
        "--rounds", str(ROUNDS), "--inner-steps", "4", "--model", "nano", "--json", str(summary_path),
        "--dir", str(tmp_path / "swarm"), "--behave", f"{SILENT}:silent",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peers = json.loads(summary_path.read_text())["per_peer"]
    silent = peers[SILENT]["peer"]
    honest = [p for i, p in enumerate(peers) if i != SILENT]
    honest_ids = {p["peer"] for p in honest}
    for p in honest:
        excluded = p["guard"]["excluded"]
        assert silent in excluded, p["guard"]  # every honest peer learnt the run excluded it ...
        assert excluded[silent] < ROUNDS - 5, p["guard"]  # ... with rounds to spare
        assert not set(excluded) & honest_ids, p["guard"]
        assert p["exit_code"] == 0 and p["rounds_swapped"] >= ROUNDS // 3, p
        assert p["eval_loss_end"] < p["eval_loss_start"], p
    accusers = set()
    for index in range(PEERS):
        log = (tmp_path / "swarm" / f"peer-{index}.log").read_text()
        if "stays in the run but never answered" in log:
            accusers.add(index)
            assert all(silent in line for line in log.splitlines() if "never answered" in line)
    assert len(accusers) >= 2 and SILENT not in accusers  # a quorum of two, all honest
