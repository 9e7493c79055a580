"""A joiner compares what it trains with what the run trains, and says what to change."""

from shoal.peer.config import PeerConfig
from shoal.peer.run_settings import RUN_SETTINGS, run_settings, settings_mismatch, valid_settings

HELLO = {"method": "compressed-noloco", "corpus_sha256": "ab" * 32}


def test_the_same_settings_match_and_a_peers_own_choices_do_not_count():
    mine = run_settings(PeerConfig(run_id="r", batch_size=4, threads=1, rounds=5), HELLO)
    run = run_settings(PeerConfig(run_id="r", batch_size=64, shard=(1, 4)), HELLO)
    assert set(mine) == set(RUN_SETTINGS) and valid_settings(mine)
    assert settings_mismatch(mine, run) == ""


def test_another_method_names_the_option_to_pass():
    mine = run_settings(PeerConfig(run_id="r"), {**HELLO, "method": "noloco"})
    run = run_settings(PeerConfig(run_id="r"), HELLO)
    assert settings_mismatch(mine, run) == (
        "it trains with method 'compressed-noloco', this peer with 'noloco'; "
        "join with --method compressed-noloco"
    )


def test_another_corpus_says_where_the_data_comes_from():
    mine = run_settings(PeerConfig(run_id="r"), {**HELLO, "corpus_sha256": "cd" * 32})
    problem = settings_mismatch(mine, run_settings(PeerConfig(run_id="r"), HELLO))
    assert "corpus" in problem and "--data" in problem


def test_settings_from_the_network_are_checked():
    good = run_settings(PeerConfig(run_id="r"), HELLO)
    assert not valid_settings({**good, "extra": 1})
    assert not valid_settings({**good, "model": ["not", "a", "string"]})
    assert not valid_settings({**good, "model": "x" * 1000})
    assert not valid_settings("settings")
