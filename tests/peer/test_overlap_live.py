"""Two real peers with `--overlap`: they train each next round while the last one is swapped, swap every
round, and end with the same number of rounds, evaluations and a checkpoint, as peers without it do."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow  # real peer processes

ROUNDS = 6


def test_two_overlapped_peers_swap_every_round_and_finish(start_peer):
    common = ["--run", "overlap", "--listen", "127.0.0.1:0", "--model", "nano", "--inner-steps", "4",
              "--threads", "1", "--wait-peers", "2", "--rounds", str(ROUNDS), "--overlap"]  # fmt: skip
    a = start_peer("a", *common)
    address = a.wait_for(lambda e: e["event"] == "listening")["address"]
    b = start_peer("b", *common, "--bootstrap", address)
    for peer in (a, b):
        done = peer.wait_for(lambda e: e["event"] == "done", timeout=240)
        assert done["round"] == ROUNDS
        rounds = peer.of_kind("round")
        outcomes = [(r["round"], r["outcome"]) for r in rounds]
        # Every round was swapped (one may time out on a loaded machine), none twice, none lost.
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), outcomes
        assert sum(r["outcome"] == "swapped" for r in rounds) >= ROUNDS - 1, outcomes
        # Each settled round was evaluated once (round 0: the start), every loss finite and the last lower.
        evals = peer.of_kind("eval")
        assert [e["round"] for e in evals] == list(range(ROUNDS + 1)), evals
        assert (
            all(math.isfinite(e["eval_loss"]) for e in evals)
            and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
        )
