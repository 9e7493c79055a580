"""A peer that joins a run in progress starts from a member's current weights, not from scratch."""

from __future__ import annotations

import re
import signal

import pytest

pytestmark = pytest.mark.slow  # real peer processes


def test_a_late_joiner_starts_from_the_runs_weights_and_swaps(start_peer):
    common = [
        "--run",
        "late",
        "--listen",
        "127.0.0.1:0",
        "--rounds",
        "1000",
        "--inner-steps",
        "5",
        "--threads",
        "1",
    ]
    first = start_peer("first", *common)
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    second = start_peer("second", *common, "--bootstrap", address)
    # Let the two train together for a while.
    first.wait_for(
        lambda e: e["event"] == "round" and e["round"] >= 4 and e["outcome"] == "swapped", timeout=240
    )
    initial_loss = first.of_kind("eval")[0]["eval_loss"]

    late = start_peer("late", *common, "--bootstrap", address)
    fetched = late.wait_for(lambda e: e["event"] == "weights", timeout=180)
    assert fetched["round"] >= 4 and fetched["bytes_received"] > 4 * 100_000
    # Its first evaluation is of the run's weights: far below the loss of an untrained model.
    first_eval = late.wait_for(lambda e: e["event"] == "eval", timeout=60)
    assert first_eval["round"] == fetched["round"]
    assert first_eval["eval_loss"] < 0.9 * initial_loss, (first_eval, initial_loss)
    # It joins the rounds in step with the others, and swaps with them.
    swap = late.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=180)
    assert swap["round"] > fetched["round"]
    assert "refused by the worker" not in late.log_path.read_text()
    assert second.process.poll() is None


def test_a_peer_restarted_behind_the_run_fetches_its_weights(start_peer):
    """The run went on while a peer was down (its daemon killed): it resumes from its checkpoint, sees that
    the run is rounds past it, and takes the run's newer weights instead of training from its old ones."""
    common = [
        "--run",
        "restart",
        "--listen",
        "127.0.0.1:0",
        "--rounds",
        "1000",
        "--inner-steps",
        "5",
        "--threads",
        "1",
        # Both start at round 1: on a loaded machine a second peer that starts late joins from the first's
        # weights, and one killed right after it could have no checkpoint of its own to resume from.
        "--wait-peers",
        "2",
    ]
    first = start_peer("first", *common)
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    second = start_peer("second", *common, "--bootstrap", address)
    killed = second.wait_for(
        lambda e: e["event"] == "round" and e["round"] >= 2 and e["outcome"] == "swapped", timeout=240
    )
    second.process.send_signal(signal.SIGKILL)  # its worker sees the channel close, saves and exits
    second.wait(timeout=30)
    first.wait_for(lambda e: e["event"] == "round" and e["round"] >= killed["round"] + 8, timeout=240)

    again = start_peer("second", *common, "--bootstrap", address, log="second-again")
    fetched = again.wait_for(lambda e: e["event"] == "weights", timeout=180)
    assert again.wait_for(lambda e: e["event"] == "eval", timeout=60)["round"] == fetched["round"]
    found = re.search(r"resumed at round (\d+), the run is at round (\d+)", again.log_path.read_text())
    assert found, again.log_tail()
    resumed = int(found[1])
    # Its own checkpoint is of a round it finished (every round is saved; one the daemon jumped to and the
    # worker never heard of before the kill is not), and the run's weights are more than 2 rounds newer.
    assert resumed >= 1 and fetched["round"] > resumed + 2


def test_a_late_joiner_refuses_made_up_weights_and_takes_the_honest_members(start_peer):
    """One member serves noise of its weights' norm to joiners (test-only `--behave made_up_weights`): the
    joiner's probes of the other members show it, the lying member's spans come again from honest ones,
    and the joiner starts from the run's weights."""
    # `small` (7 MB): four spans, so that each of the three members sends one at the start.
    common = ["--run", "liar", "--listen", "127.0.0.1:0", "--rounds", "1000", "--inner-steps", "5",
              "--threads", "1", "--wait-peers", "3", "--model", "small"]  # fmt: skip
    first = start_peer("first", *common)
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    liar = start_peer("liar", *common, "--bootstrap", address, "--behave", "made_up_weights")
    start_peer("third", *common, "--bootstrap", address)
    liar_id = liar.wait_for(lambda e: e["event"] == "listening")["address"].rsplit("/p2p/", 1)[1]
    first.wait_for(
        lambda e: e["event"] == "round" and e["round"] >= 3 and e["outcome"] == "swapped", timeout=240
    )
    initial_loss = first.of_kind("eval")[0]["eval_loss"]

    late = start_peer("late", *common, "--bootstrap", address)
    fetched = late.wait_for(lambda e: e["event"] == "weights", timeout=180)
    assert liar_id in fetched["refused"], fetched
    assert liar_id not in fetched["sources"] and len(fetched["sources"]) >= 1, fetched
    first_eval = late.wait_for(lambda e: e["event"] == "eval", timeout=60)
    assert first_eval["eval_loss"] < 0.9 * initial_loss, (first_eval, initial_loss)
    assert "were refused: its values are" in late.log_path.read_text()
