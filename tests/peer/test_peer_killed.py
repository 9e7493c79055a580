"""A peer killed with SIGKILL in the middle of a run: the others keep training and finish."""

from __future__ import annotations

import itertools
import math
import signal
import time

import pytest

pytestmark = pytest.mark.slow  # real peer processes

ROUNDS = 10


def test_survivors_finish_after_a_peer_is_killed(start_peer):
    common = [
        "--run",
        "kill",
        "--listen",
        "127.0.0.1:0",
        "--rounds",
        str(ROUNDS),
        "--inner-steps",
        "6",
        "--threads",
        "1",
        "--wait-peers",
        "3",
        "--exchange-timeout",
        "20",
    ]
    first = start_peer("a", *common, "--shard", "0/3")
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    others = [
        start_peer(name, *common, "--shard", f"{i}/3", "--bootstrap", address)
        for i, name in ((1, "b"), (2, "c"))
    ]
    victim = others[1]
    survivors = [first, others[0]]

    # Kill the victim once it has swapped at least once: it is then part of everyone's pairing.
    victim.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=180)
    killed_at = {id(p): len(p.of_kind("round")) for p in survivors}
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)

    for peer in survivors:
        done = peer.wait_for(lambda e: e["event"] == "done", timeout=240)
        assert done["round"] == ROUNDS
        assert peer.wait(timeout=30) == 0, peer.log_tail()
        rounds = peer.of_kind("round")
        # Rounds only go up, to the last; a peer that started late, or waited out the killed partner's
        # deadline while the others went on, goes to the run's round (gossip/rounds/clock.py).
        numbers = [r["round"] for r in rounds]
        assert numbers == sorted(set(numbers)) and numbers[-1] == ROUNDS, numbers
        # A round number skipped over is a jump, said so in the round event and the log.
        for before, after in itertools.pairwise(rounds):
            jumped = after["round"] > before["round"] + 1
            assert after.get("jumped_from") == (before["round"] + 1 if jumped else None), (before, after)
        if any(r.get("jumped_from") for r in rounds):
            assert "jumped from round" in peer.log_path.read_text()
        # Every round either swapped a whole payload or skipped; a payload that reached the worker was whole.
        assert all(r["outcome"] == "swapped" or r["outcome"].startswith("skipped") for r in rounds)
        assert "refused by the worker" not in peer.log_path.read_text()
        evals = [e["eval_loss"] for e in peer.of_kind("eval")]
        assert all(math.isfinite(x) for x in evals) and evals[-1] < 0.9 * evals[0], evals
        # The peers that are left keep swapping with each other after the kill.
        after = rounds[killed_at[id(peer)] + 1 :]
        assert any(r["outcome"] == "swapped" for r in after), rounds
    # The victim is noticed: dropped from the membership, or skipped as a partner that cannot be reached.
    victim_id = victim.of_kind("listening")[0]["peer"]
    noticed = [e for p in survivors for e in p.of_kind("peer_lost") if e["partner"] == victim_id] + [
        r
        for p in survivors
        for r in p.of_kind("round")
        if r["partner"] == victim_id and "failed" in r["outcome"]
    ]
    assert noticed, [p.of_kind("round") for p in survivors]


FAST_PEERS = 5
SECONDS_AFTER_KILL = 60


def test_survivors_of_a_fast_run_stay_in_step_after_a_peer_is_killed(start_peer, tmp_path):
    """Rounds of a fraction of a second, and a killed peer that stays in the membership for 30 s (as in
    the compose swarm): its partners skip, so their rounds get out of step. They must fall back into
    step and keep swapping, not refuse each other for ever ("round N is too far ahead"), which is what
    they did until the round clock (gossip/rounds/clock.py)."""
    config = tmp_path / "slow-failure-detection.toml"
    config.write_text("[peer]\nfail_after = 30.0\n")
    common = ["--run", "fast", "--listen", "127.0.0.1:0", "--model", "nano", "--inner-steps", "4",
              "--batch-size", "4", "--threads", "1", "--exchange-timeout", "20", "--config", str(config),
              "--wait-peers", str(FAST_PEERS)]  # fmt: skip
    first = start_peer("p0", *common)
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    peers = [first, *(start_peer(f"p{i}", *common, "--bootstrap", address) for i in range(1, FAST_PEERS))]
    for peer in peers:
        peer.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=240)
    victim, survivors = peers[1], [peers[0], *peers[2:]]
    # Killed: whoever is paired with it skips at once (connection refused), faster than a swap, and
    # gets ahead; before the round clock one such peer ran ahead for good in 3 of 4 runs here.
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    killed_at = {id(p): len(p.of_kind("round")) for p in survivors}
    time.sleep(SECONDS_AFTER_KILL)

    last = {}
    for peer in survivors:
        rounds = peer.of_kind("round")[killed_at[id(peer)] :]
        assert len(rounds) >= 20, (len(rounds), peer.log_tail())
        # Every survivor still swaps at the end, with the others, in the same rounds as they do.
        outcomes = [r["outcome"] for r in rounds[-10:]]
        assert outcomes.count("swapped") >= 5, outcomes
        last[id(peer)] = rounds[-1]["round"]
    assert max(last.values()) - min(last.values()) <= 10, sorted(last.values())
