"""A live swarm with one hostile peer (the test-only `--behave`): its partners' guards refuse its poisoned
updates, publish the evidence, and the run stops pairing it; the honest peers go on swapping and learning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

PEERS = 4
HOSTILE = PEERS - 1


def test_a_peer_sending_scaled_updates_is_refused_and_excluded_by_the_run(tmp_path):
    summary_path = tmp_path / "summary.json"
    command = [
        sys.executable, "-P", "-m", "shoal.peer", "swarm", "--peers", str(PEERS), "--run", "poison",
        "--rounds", "14", "--inner-steps", "4", "--model", "nano", "--json", str(summary_path),
        "--dir", str(tmp_path / "swarm"), "--behave", f"{HOSTILE}:scale",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    peers = summary["per_peer"]
    attacker = peers[HOSTILE]["peer"]
    honest = [p for i, p in enumerate(peers) if i != HOSTILE]
    honest_ids = {p["peer"] for p in honest}
    # Every honest peer paired with it refused it; none excluded an honest peer, and none refused one
    # except, rarely, by a robust rule (an outlier against recent partners: no strike, a round's pull lost;
    # 11 of 4,000 honest verdicts over 500 simulated rounds), never by any other rule. Under load they are
    # less rare: a CI-like run of the whole suite saw one receiver refuse two honest partners (outlier-cos).
    refusals = sum(p["guard"]["refused"].get(attacker, 0) for p in honest)
    assert refusals >= 3, [p["guard"] for p in honest]
    honest_refusals = [
        (p["peer"], partner, why, count)
        for p in honest
        for partner, reasons in p["guard"]["reasons"].items()
        if partner in honest_ids
        for why, count in reasons.items()
        if why.startswith("refuse:")
    ]
    assert all(why.startswith("refuse: outlier-") for _, _, why, _ in honest_refusals), honest_refusals
    assert sum(count for *_, count in honest_refusals) <= 2, honest_refusals
    for p in honest:
        assert not set(p["guard"]["excluded"]) & honest_ids, p["guard"]
    # Two honest accusers are a quorum in a run of four: every honest peer learns the run excluded it.
    excluded_at = [p["guard"]["excluded"].get(attacker) for p in honest]
    assert all(r is not None for r in excluded_at), [p["guard"] for p in honest]
    # After that, the honest peers swap among themselves, and they learned.
    for p in honest:
        assert p["rounds_swapped"] >= 7, honest
        assert p["eval_loss_end"] < p["eval_loss_start"] - 0.5, honest
