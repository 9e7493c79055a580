"""How a failed daemon reports: one line per cause (a ShoalError's message), one line saying it is a bug for
anything else, tracebacks only with --debug. The process-level checks are in test_first_hour.py."""

from __future__ import annotations

import pytest

from shoal.peer.cli import failure_lines
from shoal.peer.config import ConfigError, PeerConfig
from shoal.peer.daemon import DaemonError, _worker_error


def group(*errors: Exception) -> ExceptionGroup:
    """What the daemon's task group raises, nested once as the exit stack can leave it."""
    return ExceptionGroup("outer", [ExceptionGroup("unhandled errors in a TaskGroup", list(errors))])


def test_a_shoal_error_inside_the_task_group_is_its_message(capsys):
    lines = failure_lines(group(DaemonError("cannot reach the bootstrap peer: check it")), debug=False)
    assert lines == ["cannot reach the bootstrap peer: check it"]
    assert capsys.readouterr().err == ""


def test_anything_else_is_one_line_that_calls_it_a_bug(capsys):
    (line,) = failure_lines(group(KeyError("members")), debug=False)
    assert "unexpected KeyError" in line and "bug" in line and "--debug" in line
    assert "Traceback" not in capsys.readouterr().err


def test_debug_prints_the_tracebacks_the_workers_included(capsys):
    error = _worker_error({"message": "the data file x is not text", "traceback": "Traceback (worker)\n"})
    try:
        raise group(error)
    except ExceptionGroup as raised:
        lines = failure_lines(raised, debug=True)
    assert lines == ["the data file x is not text"]
    err = capsys.readouterr().err
    assert "Traceback" in err and "Traceback (worker)" in err


def test_a_worker_bug_says_so():
    error = _worker_error({"message": "ZeroDivisionError: division by zero", "bug": True, "traceback": "..."})
    assert "ZeroDivisionError" in str(error) and "bug in Shoal" in str(error)
    assert error.details == "..."


@pytest.mark.parametrize(
    "address",
    [
        "/ip4/10.0.0/tcp/4701",
        "/ip4/10.0.0.5/udp/4701",
        "/ip4/10.0.0.5/tcp/4701/p2p/xyz",
        "10.0.0.5:4701",
        "x",
    ],
)
def test_a_malformed_bootstrap_address_is_a_config_error(address):
    with pytest.raises(ConfigError, match="bootstrap address"):
        PeerConfig(run_id="r", bootstrap=(address,))


def test_well_formed_bootstrap_addresses_pass():
    PeerConfig(
        run_id="r",
        bootstrap=(
            "/ip4/10.0.0.5/tcp/4701",
            "/dns4/bootstrap.example.org/tcp/4701/p2p/12D3KooWAHXoy7aAiDAZ3LHsgQK7DGyTjJQXxvqKxoaJCPm44ttB",
            "/ip6/::1/tcp/4701",
        ),
    )
