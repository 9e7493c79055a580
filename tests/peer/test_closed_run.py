"""A closed run: its creator issues join tokens with `peer token`; only their holders become members."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.peer.conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

COMMON = [
    "--run",
    "closed",
    "--listen",
    "127.0.0.1:0",
    "--rounds",
    "1000",
    "--inner-steps",
    "5",
    "--threads",
    "1",
]


def _peer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_only_token_holders_join_a_closed_run(start_peer, tmp_path):
    creator = start_peer("creator", *COMMON, "--closed")
    address = creator.wait_for(lambda e: e["event"] == "listening")["address"]

    made = _peer_cli("keygen", str(tmp_path / "guest.key"))
    assert made.returncode == 0, made.stderr
    guest_id = made.stdout.split("peer id ")[1].strip()
    issued = _peer_cli(
        "token", "--run", "closed", "--for", guest_id, "--state-dir", str(tmp_path / "creator")
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert token.startswith("shoal-token-1.")

    # A stranger without a token is told, in one line, what to ask for.
    stranger = start_peer("stranger", *COMMON, "--bootstrap", address)
    assert stranger.wait(timeout=120) == 1
    output = stranger.log_path.read_text()
    assert "is closed" in output and "peer token --run closed --for" in output, output
    assert "Traceback" not in output
    # Someone else's token does not let another key in.
    thief = start_peer("thief", *COMMON, "--bootstrap", address, "--token", token)
    assert thief.wait(timeout=120) == 1
    assert f"the token is for peer {guest_id}" in thief.log_path.read_text()

    guest = start_peer(
        "guest", *COMMON, "--bootstrap", address, "--key", str(tmp_path / "guest.key"), "--token", token
    )
    swap = guest.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=240)
    assert swap["partner"] == creator.events[0]["peer"]
    creator.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=60)


def test_token_command_errors_are_one_line(tmp_path):
    for args, expected in [
        (["--run", "r", "--any", "--key", str(tmp_path / "missing.key")], "no key file"),
        (["--run", "r", "--for", "not-a-peer-id", "--key", str(tmp_path / "missing.key")], "not-a-peer-id"),
        (["--run", "r"], "exactly one of --for PEER_ID and --any"),
        (["--run", "r", "--any", "--expires", "soon"], "duration"),
    ]:
        result = _peer_cli("token", *args)
        assert result.returncode != 0 and expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_run_asks_every_member_for_its_identity_work(start_peer, monkeypatch):
    monkeypatch.delenv("SHOAL_IDENTITY_BITS")  # the product's default
    first = start_peer("first", *COMMON)
    address = first.wait_for(lambda e: e["event"] == "listening", timeout=180)["address"]
    state = first.log_path.parent / "first"
    assert json.loads((state / "identity-work.json").read_text())["bits"] == 20
    cheap = start_peer("cheap", *COMMON, "--bootstrap", address, "--identity-bits", "4")
    assert cheap.wait(timeout=120) == 1
    output = cheap.log_path.read_text()
    assert "asks each member for 20 bits of identity work" in output and "--identity-bits 20" in output
    assert "Traceback" not in output
    second = start_peer("second", *COMMON, "--bootstrap", address)
    second.wait_for(lambda e: e["event"] == "round" and e["outcome"] == "swapped", timeout=240)
