"""Run rendezvous through the DHT: a newcomer that knows only a peer of another run finds its own run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # real peer processes


def test_a_newcomer_finds_its_run_through_a_peer_of_another_run(start_peer):
    common = ["--listen", "127.0.0.1:0", "--rounds", "1000", "--inner-steps", "4", "--threads", "1"]
    first_x = start_peer("x1", "--run", "run-x", *common)
    x_address = first_x.wait_for(lambda e: e["event"] == "listening")["address"]

    # A peer of run Y bootstraps from the run-X peer: nobody announced run Y, so it starts run Y.
    first_y = start_peer("y1", "--run", "run-y", *common, "--bootstrap", x_address)
    y_address = first_y.wait_for(lambda e: e["event"] == "listening")["address"]
    first_y.wait_for(lambda e: e["event"] == "worker", timeout=120)

    # A newcomer of run X knows only the run-Y peer: the DHT's provider records lead it to run X.
    newcomer = start_peer("x2", "--run", "run-x", *common, "--bootstrap", y_address)
    x1_id = first_x.of_kind("listening")[0]["peer"]
    joined = newcomer.wait_for(lambda e: e["event"] == "peer_joined" and e["partner"] == x1_id, timeout=120)
    assert joined["address"] == x_address
    # ... and trains with it: the two run-X peers swap a round.
    swapped = newcomer.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=180)
    assert swapped["partner"] == x1_id
    # The run-Y peer never becomes a member of run X.
    y_id = first_y.of_kind("listening")[0]["peer"]
    assert not any(e["partner"] == y_id for e in newcomer.of_kind("peer_joined"))
    assert "started it" in first_y.log_path.read_text()
