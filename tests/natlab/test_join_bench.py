"""bench.join, the parts that need no root and no peers: the joiner's log timestamps, the figures of a
config from canned events, the ratios, and the exit code without root."""

import datetime
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `bench` is a folder of the repository, not an installed package: `python -m pytest` from the root finds
# it, the `pytest` script alone does not (importlib mode), so the root goes on the path here.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
join = importlib.import_module("bench.join")
fetch_start, log_notes, log_time = join.fetch_start, join.log_notes, join.log_time
ratios, summarize, BenchError = join.ratios, join.summarize, join.BenchError

NEW_LINE = (
    "2025-03-04 10:20:30,125 INFO shoal.peer.daemon: [12D3J] fetching 14.3 MB of the run's weights from "
    "12D3A: up to 2m 0s at an unmeasured rate"
)
OLD_LINE = (
    "2025-03-04 10:20:31,500 INFO shoal.peer.daemon: [12D3J] fetching the run's weights (43.0 MB) from "
    "12D3A: up to 6m 0s at an unmeasured rate"
)


def test_log_time_reads_the_local_timestamp_to_the_millisecond():
    expected = datetime.datetime(2025, 3, 4, 10, 20, 30, 125_000).timestamp()
    assert log_time(NEW_LINE) == pytest.approx(expected, abs=1e-6)
    assert log_time(OLD_LINE) - log_time(NEW_LINE) == pytest.approx(1.375, abs=1e-6)
    assert log_time("starting from a member's weights of round 3") is None
    assert log_time("") is None


def test_the_fetch_starts_at_the_first_fetch_line_new_or_old():
    lines = [
        "2025-03-04 10:20:20,000 INFO shoal.peer.daemon: [12D3J] listening on /ip4/10.232.0.2/tcp/1234",
        NEW_LINE,
        "2025-03-04 10:20:30,900 INFO shoal.peer.daemon: [J] fetching 14.3 MB of the run's weights from B",
    ]
    stamp, line = fetch_start(lines)
    assert stamp == log_time(NEW_LINE) and line == NEW_LINE
    assert fetch_start([OLD_LINE])[0] == log_time(OLD_LINE)
    assert fetch_start(["2025-03-04 10:20:20,000 INFO x: weights round 3"]) == (None, None)
    refused = "2025-03-04 10:20:40,000 WARNING shoal.peer.daemon: the run's weights from L were refused: far"
    assert log_notes([NEW_LINE, refused]) == [refused]


def _events(peer: str, rounds: list[tuple[int, float]], evals: list[tuple[int, float, float]]) -> list[dict]:
    out: list[dict] = [{"event": "listening", "peer": peer, "t": 0.0, "address": f"/ip4/x/p2p/{peer}"}]
    out += [{"event": "round", "peer": peer, "round": n, "t": t, "outcome": "swapped"} for n, t in rounds]
    out += [{"event": "eval", "peer": peer, "round": n, "t": t, "eval_loss": loss} for n, t, loss in evals]
    return sorted(out, key=lambda e: e["t"])


def members() -> dict[str, list[dict]]:
    return {
        "m0": _events(
            "A", [(1, 10.0), (2, 20.0), (3, 40.0)], [(1, 11.0, 6.0), (2, 21.0, 5.0), (3, 41.0, 4.6)]
        ),
        "m1": _events("B", [(1, 10.0), (2, 20.0)], [(1, 11.0, 6.2), (2, 21.0, 5.2), (3, 41.5, 4.8)]),
        "m2": _events("C", [(1, 10.0), (2, 20.0)], [(1, 11.0, 6.4), (2, 21.0, 5.4)]),
        "liar": _events("L", [(1, 10.0), (2, 20.0)], [(2, 21.0, 5.3)]),
    }


def test_a_config_sums_up_from_canned_events():
    joiner = [
        {"event": "listening", "peer": "J", "t": 25.0},
        {"event": "worker", "peer": "J", "t": 27.0, "parameters": 10},
        {
            "event": "weights",
            "peer": "J",
            "t": 37.5,
            "round": 2,
            "bytes_received": 52_000_000,
            "source": "A",
            "sources": {"A": 20_000_000, "B": 12_000_000, "C": 11_000_000},
            "refused": {"L": "its values are 1.2 of their norm from other members' (at most 0.25)"},
        },
        {"event": "eval", "peer": "J", "t": 45.0, "round": 2, "eval_loss": 5.21},
    ]
    r = summarize(22.5, joiner, members(), 30.0, liar="liar")
    assert r["total_s"] == 15.0 and r["fetch_s"] == 7.5 and r["worker_to_weights_s"] == 10.5
    assert r["bytes_received"] == 52_000_000 and r["weights_round"] == 2
    assert r["fetch_mbit_s"] == round(52e6 * 8 / 7.5 / 1e6, 1)
    assert r["sources"] == {"m0": 20_000_000, "m1": 12_000_000, "m2": 11_000_000}
    assert r["sources_reported"] is True
    assert list(r["refused"]) == ["liar"] and r["liar_refused"] and r["liar_sent"]
    assert r["liar_bytes_kept"] == 0
    assert r["bytes_fetched_again"] == 9_000_000  # the liar's refused part, fetched again from others
    assert r["rounds_at_join"] == {"m0": 2, "m1": 2, "m2": 2, "liar": 2}
    assert r["joiner_eval"] == {"round": 2, "loss": 5.21}
    assert r["members_eval_at_weights_round"] == {"m0": 5.0, "m1": 5.2, "m2": 5.4, "liar": 5.3}
    assert r["members_eval_at_weights_round_median"] == 5.2  # the liar left out
    # The latest before the joiner's eval (t 45): m0 and m1 at round 3, m2 at round 2.
    assert r["members_latest_eval"]["m0"] == {"round": 3, "loss": 4.6}
    assert r["members_latest_eval"]["m2"] == {"round": 2, "loss": 5.4}
    assert r["members_latest_eval_median"] == 4.8
    assert r["joiner_eval_over_members"] == round(5.21 / 5.2, 4)
    assert r["member_ids"] == {"m0": "A", "m1": "B", "m2": "C", "liar": "L"}


def test_an_old_trees_weights_event_names_one_source_that_sent_everything():
    joiner = [
        {"event": "weights", "peer": "J", "t": 30.0, "round": 2, "bytes_received": 43_000_000, "source": "B"},
    ]
    one = {name: evs for name, evs in members().items() if name in ("m0", "m1")}
    r = summarize(25.0, joiner, one, None)
    assert r["sources"] == {"m1": 43_000_000} and r["sources_reported"] is False
    assert r["refused"] == {} and r["fetch_s"] is None and r["fetch_mbit_s"] is None
    assert r["joiner_eval"] is None and "liar" not in r
    assert r["members_latest_eval"]["m0"] == {"round": 2, "loss": 5.0}  # up to the weights event


def test_no_weights_event_is_an_error():
    with pytest.raises(BenchError):
        summarize(
            0.0, [{"event": "eval", "peer": "J", "t": 5.0, "round": 0, "eval_loss": 9.0}], members(), 1.0
        )


def test_ratios_per_tree_and_against_the_other_tree():
    def cfg(label: str, n: int, fetch: float, total: float, liar: bool = False) -> dict:
        return {"label": label, "members": n, "fetch_s": fetch, "total_s": total, "liar": liar}

    configs = [
        cfg("new", 1, 40.0, 60.0),
        cfg("old", 1, 36.0, 55.0),
        cfg("new", 3, 16.0, 35.0),
        cfg("old", 3, 36.0, 56.0),
        cfg("new", 3, 30.0, 50.0, liar=True),
        {"label": "new", "members": 2, "error": "cut", "liar": False},
    ]
    out = ratios(configs, "new")
    assert out["per_tree"]["new"] == {"members": [1, 3], "fetch_s_ratio": 0.4, "total_s_ratio": 0.583}
    assert out["per_tree"]["old"]["fetch_s_ratio"] == 1.0
    assert out["vs_this_tree"]["new/old 3 members"]["fetch_s_ratio"] == round(16 / 36, 3)
    assert out["vs_this_tree"]["new/old 1 members"]["total_s_ratio"] == round(60 / 55, 3)


def test_without_root_it_exits_2_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["python -m bench.join", "--json", "/nonexistent/join.json"])
    with pytest.raises(SystemExit) as exit_:
        join.main()
    assert exit_.value.code == 2
    assert "bench.join: cannot run: needs root" in capsys.readouterr().err
    assert not Path("/nonexistent/join.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="run as root: the in-process test above stands in")
def test_the_command_exits_2_without_root():
    done = subprocess.run(
        [sys.executable, "-m", "bench.join", "--json", "/tmp/never-written.json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and "needs root" in done.stderr
