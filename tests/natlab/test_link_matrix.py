"""bench.link's matrix mode, the pure parts (no root, no peers): how the inner steps are chosen and how
the utilizations come out of the peers' events."""

import argparse
from pathlib import Path

import pytest

from bench.link_matrix import (
    RunSpec,
    choose_inner_steps,
    codec_mb_s,
    compute_utilization,
    pair_rows,
    peer_argv,
    rate_bytes_per_s,
    round_phases,
    summarize,
    training_windows,
)


def test_rates_are_read_as_tc_spells_them():
    assert rate_bytes_per_s("10mbit") == 1.25e6
    assert rate_bytes_per_s("500kbit") == 62_500
    assert rate_bytes_per_s("1gbit") == 1.25e8
    with pytest.raises(ValueError):
        rate_bytes_per_s("10MB")


def test_inner_steps_make_compute_about_twice_the_exchange():
    # 5 MB each way at 10 Mbit/s is 4 s, plus two 50 ms round trips: 4.1 s; twice that over 0.5 s steps.
    assert choose_inner_steps(0.5, 5e6, "10mbit", 50.0) == 17
    assert choose_inner_steps(0.5, 5e6, "100mbit", 50.0) == 2  # 0.5 s exchange: 1 s of compute
    assert choose_inner_steps(10.0, 1e3, "100mbit", 0.0) == 1  # never fewer than one
    assert choose_inner_steps(0.5, 5e6, "10mbit", 50.0, ratio=1.0) == 9
    with pytest.raises(ValueError):
        choose_inner_steps(0.0, 5e6, "10mbit", 50.0)


def _peer(
    peer_id, partner, rounds, train_s, swap_s, start=1000.0, outcome="swapped", sent=4_000_000, timed=None
):
    """Events of one peer: an eval before round 1, then per round `train_s` of training, a swap of
    `swap_s`, and 0.5 s of outer step, checkpoint and evaluation. `timed(number)`, if given: the worker's
    timings of round `number`, {field: seconds}, put on its `round` event (train_seconds, encode_seconds)
    and its `eval` event (the others), as the worker reports them."""
    events = [{"event": "worker", "peer": peer_id, "parameters": 1_000_000}]
    events.append({"event": "eval", "peer": peer_id, "round": 0, "t": start})
    t = start
    for number in range(1, rounds + 1):
        t += train_s + swap_s
        events.append(
            {
                "event": "round",
                "peer": peer_id,
                "round": number,
                "partner": partner,
                "outcome": outcome,
                "bytes_sent": sent,
                "bytes_received": sent,
                "seconds": swap_s,
                "t": t,
            }
        )
        t += 0.5
        events.append({"event": "eval", "peer": peer_id, "round": number, "t": t})
        for field, value in (timed(number) if timed else {}).items():
            events[-2 if field in ("train_seconds", "encode_seconds") else -1][field] = value
    return events


def test_training_time_runs_from_the_last_evaluation_to_the_payload():
    events = _peer("A", "B", 3, train_s=8.0, swap_s=4.0)
    assert training_windows(events) == pytest.approx({1: 8.0, 2: 8.0, 3: 8.0})
    measured = compute_utilization(events)
    assert measured is not None
    # Rounds 2 and 3: 2 x 8 s of training in 2 x 12.5 s of wall time.
    assert measured["train_s"] == pytest.approx(16.0)
    assert measured["wall_s"] == pytest.approx(25.0)
    assert measured["utilization"] == pytest.approx(0.64)
    assert compute_utilization(events[:3]) is None  # one round: nothing after the first to measure


def test_a_round_without_its_evaluation_is_not_measured():
    events = [e for e in _peer("A", "B", 3, 8.0, 4.0) if not (e["event"] == "eval" and e["round"] == 1)]
    assert 2 not in training_windows(events)
    assert compute_utilization(events) is None


def test_link_utilization_per_pair_of_partners_and_unswapped_rounds_counted():
    # 4 MB each way in 4 s on each side at 10 Mbit/s (1.25 MB/s): 8 MB / (2 x 1.25 MB/s x 4 s) = 0.8.
    by_peer = {
        "p0": _peer("A", "B", 3, 8.0, 4.0),
        "p1": _peer("B", "A", 3, 8.0, 4.0),
        "p2": _peer("C", "D", 3, 8.0, 4.0),
        "p3": _peer("D", "C", 3, 8.0, 4.0, outcome="skipped: partner busy"),
    }
    rows = pair_rows(by_peer)
    assert len(rows) == 6  # two pairs in each of three rounds
    assert {(r["a"], r["b"]) for r in rows} == {("p0", "p1"), ("p2", "p3")}
    spec = RunSpec("base", 4, "10mbit", 50.0, 3, 16)
    rss = {"worker_kb": {"p0": 40_000, "p1": 50_000}, "daemon_kb": {"p0": 100_000}}
    result = summarize(spec, by_peer, rss)
    assert result["rate_mbit"] == 10.0
    assert (result["rounds"], result["peer_rounds"], result["swapped"]) == (3, 12, 9)
    assert result["rounds_all_swapped"] == 0
    assert {item["outcome"] for item in result["not_swapped"]} == {"skipped: partner busy"}
    assert result["swapped_pairs"] == 3 and result["link_utilization"] == pytest.approx(0.8)
    assert result["link_utilization_done"] == pytest.approx(0.8)  # aligned: both ready at once
    assert result["compute_utilization"] == pytest.approx(0.64)
    assert result["worker_peak_rss_over_model"] == pytest.approx(50_000 * 1024 / 4e6, abs=0.01)
    assert result["daemon_peak_rss_mb"] == pytest.approx(97.7, abs=0.1)
    # Peers that report no timings (an older worker): no codec figures, no breakdown.
    assert result["encode_mb_s"] is None and result["decode_mb_s"] is None and result["codec_note"]
    assert set(result["round_seconds_median"].values()) == {None} and result["timed_peer_rounds"] == 0
    assert result["batch_size"] is None


def test_the_workers_own_count_of_training_seconds_is_used_where_the_peers_report_it():
    # An overlapped peer trains while its round is swapped: the events' windows would miss that time.
    events = _peer("A", "B", 3, train_s=8.0, swap_s=4.0)
    for e in events:
        if e["event"] == "round":
            e["train_seconds"] = 11.0
    measured = compute_utilization(events)
    assert measured is not None and measured["train_s"] == pytest.approx(22.0)
    assert measured["utilization"] == pytest.approx(22.0 / 25.0)


def _timings(peer_index):
    """Round `number`'s timings on peer `peer_index`: each phase a little longer on later rounds and peers,
    so that the medians below are over all peers' swapped rounds."""

    def timed(number):
        extra = 0.1 * (number - 1) + 0.01 * peer_index
        return {
            "train_seconds": 8.0 + extra,
            "encode_seconds": 0.2 + extra,
            "guard_seconds": 1.0 + extra,
            "outer_seconds": 0.4 + extra,
            "snapshot_seconds": 0.3 + extra,
            "eval_seconds": 5.0 + extra,
        }

    return timed


def test_codec_speeds_and_the_round_breakdown_come_from_the_workers_timings():
    by_peer = {
        "p0": _peer("A", "B", 3, 8.0, 4.0, timed=_timings(0)),
        "p1": _peer("B", "A", 3, 8.0, 4.0, timed=_timings(1)),
        "p2": _peer("C", "D", 3, 8.0, 4.0, timed=_timings(2)),
        # Not swapped: its (cheaper) outer step alone and its encode are not the codec's figures.
        "p3": _peer(
            "D", "C", 3, 8.0, 4.0, outcome="skipped: partner busy", timed=lambda n: {"outer_seconds": 9}
        ),
    }
    phases = round_phases(by_peer)
    assert {name: len(values) for name, values in phases.items()} == {
        "train": 9, "encode": 9, "guard": 9, "outer": 9, "snapshot": 9, "eval": 9
    }  # fmt: skip
    spec = RunSpec("base", 4, "10mbit", 50.0, 3, 16, batch_size=2)
    result = summarize(spec, by_peer, {})
    # The medians over 3 swapping peers x 3 rounds: round 2 of peer p1 (extra 0.1 + 0.01).
    assert result["round_seconds_median"] == pytest.approx(
        {"train": 8.11, "encode": 0.31, "guard": 1.11, "outer": 0.51, "snapshot": 0.41, "eval": 5.11}
    )
    assert result["timed_peer_rounds"] == 9
    # 1 M parameters: 4 MB of fp32 over the median seconds.
    assert result["encode_mb_s"] == pytest.approx(4.0 / 0.31, abs=0.1)
    assert result["decode_mb_s"] == pytest.approx(4.0 / 0.51, abs=0.1)  # decode + the outer step's apply
    assert result["batch_size"] == 2


def test_codec_speeds_need_a_positive_time_and_a_model_size():
    assert codec_mb_s(1_000_000, [0.5, 1.0, 2.0]) == 4.0
    assert codec_mb_s(1_000_000, []) is None
    assert codec_mb_s(1_000_000, [0.0, 0.0]) is None  # rounded to the millisecond: too quick to tell
    assert codec_mb_s(0, [1.0]) is None


def test_an_eval_event_of_an_unswapped_round_or_a_missing_one_leaves_the_round_out():
    events = _peer("A", "B", 3, 8.0, 4.0, timed=_timings(0))
    events = [e for e in events if not (e["event"] == "eval" and e["round"] == 2)]
    phases = round_phases({"p0": events})
    assert len(phases["train"]) == len(phases["encode"]) == 3  # from the round events
    assert phases["outer"] == pytest.approx([0.4, 0.6])  # rounds 1 and 3 only


def test_the_batch_size_reaches_every_peer_or_is_left_to_their_default():
    args = argparse.Namespace(threads=1, exchange_timeout=300.0, overlap="off")
    with_batch = peer_argv(RunSpec("gpt2-small", 2, None, 0.0, 3, 4, 1), "10.0.0.1", "0/2", Path("/s"), args)
    assert with_batch[with_batch.index("--batch-size") + 1] == "1"
    assert "--batch-size" not in peer_argv(
        RunSpec("base", 2, None, 0.0, 3, 4), "10.0.0.1", "0/2", Path("/s"), args
    )


def test_the_workers_phase_peaks_count_toward_its_peak_where_the_samples_missed_them():
    # The worker resets its VmHWM as each phase begins: a 1-s sample may have missed the outer step's peak.
    by_peer = {"p0": _peer("A", "B", 2, 8.0, 4.0), "p1": _peer("B", "A", 2, 8.0, 4.0)}
    peaks = {
        ("p1", 1): {"inner": 2400, "outer": 2600},
        ("p1", 2): {"inner": 2450, "outer": 2500},
        ("p0", 1): {"eval": 2550, "bad": "x"},
    }
    for name, events in by_peer.items():
        for event in events:
            if event["event"] == "eval" and (name, event["round"]) in peaks:
                event["peak_mb"] = peaks[name, event["round"]]
    rss = {"worker_kb": {"p0": 2_000 * 1024, "p1": 2_100 * 1024}, "daemon_kb": {}}
    result = summarize(RunSpec("base", 2, "10mbit", 50.0, 2, 16), by_peer, rss)
    assert result["worker_peak_mb_by_phase"] == {"inner": 2450, "outer": 2600, "eval": 2550}
    assert result["worker_peak_rss_mb"] == 2600.0
