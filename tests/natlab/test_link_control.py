"""bench.link_control's pure part (no root, no hosts): what its measures say."""

from bench.link_control import summarize


def test_a_swap_and_the_requests_beside_it_are_summed_up():
    raw = {"swap_s": [0.52, 0.50, 0.61], "request_s": [0.14, None, 0.30, 0.15]}
    result = summarize(raw, 5_000_000, 12.5e6)
    assert result["swap_s_median"] == 0.52
    assert result["link_utilization"] == round(5_000_000 / 12.5e6 / 0.52, 3)  # both ways over both ways
    assert (result["requests"], result["requests_failed"]) == (4, 1)
    assert (result["request_s_median"], result["request_s_max"]) == (0.15, 0.30)
    nothing_answered = summarize({"swap_s": [1.0], "request_s": [None]}, 1, 1.0)
    assert nothing_answered["request_s_median"] is None and nothing_answered["requests_failed"] == 1
