"""Two peers, one killed and restarted from its checkpoint: they swap again within a few rounds, without
skipping past each other's round (issue 19: 8 -> 10 and 9 -> 11, four rounds without a swap)."""

from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.slow  # real peer processes

RESTART_ROUNDS = 3  # rounds the restarted peer may take to swap again: a jump, and one round lost at most


def test_two_peers_swap_again_soon_after_one_restarts(start_peer, tmp_path):
    # The survivor keeps the killed peer as its partner while it is down (as in the compose swarm), so
    # both are near the same round when it comes back, where a restart used to make them leapfrog.
    config = tmp_path / "slow-failure-detection.toml"
    config.write_text("[peer]\nfail_after = 30.0\n")
    common = ["--run", "restart", "--listen", "127.0.0.1:0", "--model", "nano", "--inner-steps", "2",
              "--threads", "1", "--exchange-timeout", "20", "--wait-peers", "2",
              "--config", str(config)]  # fmt: skip
    survivor = start_peer("a", *common)
    address = survivor.wait_for(lambda e: e["event"] == "listening")["address"]
    victim = start_peer("b", *common, "--bootstrap", address)
    victim.wait_for(lambda e: e["event"] == "round" and e["round"] >= 8, timeout=240)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    killed_at = len(survivor.of_kind("round"))

    restarted = start_peer("b", *common, "--bootstrap", address)  # the same state dir: its checkpoint
    restarted.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=240)
    back = restarted.of_kind("round")
    survivor.wait_for(lambda e: e["event"] == "round" and e["round"] >= back[-1]["round"] + 5, timeout=120)
    back = restarted.of_kind("round")
    first_swap = next(i for i, r in enumerate(back) if r["outcome"] == "swapped")
    assert first_swap < RESTART_ROUNDS, [(r["round"], r["outcome"], r.get("jumped_from")) for r in back]
    # They swap in the same rounds: the restarted peer's first swap is one of the survivor's.
    after = survivor.of_kind("round")[killed_at:]
    assert back[first_swap]["round"] in {r["round"] for r in after if r["outcome"] == "swapped"}, (
        back,
        after,
    )
    # No leapfrog: the restarted peer, behind, may jump to the survivor's round; the survivor, ahead,
    # never jumps on before they meet (before the fix each jumped past the other's round).
    meet = back[first_swap]["round"]
    assert not [r for r in after if r["round"] <= meet and r.get("jumped_from")], (back, after)
    # And they keep swapping (most rounds: on a loaded machine a round may still time out now and then).
    outcomes = [(r["round"], r["outcome"]) for r in back]
    later = back[first_swap : first_swap + 5]
    assert sum(r["outcome"] == "swapped" for r in later) >= len(later) - 1, outcomes
