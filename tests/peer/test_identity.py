"""A peer's identity: readable key files are refused, and so are two live daemons with one key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # real peer processes

ENV = dict(os.environ)


def test_keygen_writes_an_owner_only_key_and_join_refuses_a_readable_one(tmp_path):
    key = tmp_path / "peer.key"
    made = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "keygen", str(key)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    assert made.returncode == 0 and "peer id 12D3KooW" in made.stdout, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    again = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "keygen", str(key)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    assert again.returncode != 0 and "already exists" in again.stderr  # an identity is never overwritten

    key.chmod(0o644)
    refused = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "join", "--run", "k", "--key", str(key)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    assert refused.returncode == 1 and "others may read" in refused.stderr


def test_a_second_daemon_with_the_same_key_is_refused_naming_both_addresses(start_peer, tmp_path):
    key = tmp_path / "shared.key"
    subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "keygen", str(key)],
        check=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    common = [
        "--run",
        "twins",
        "--listen",
        "127.0.0.1:0",
        "--rounds",
        "1000",
        "--threads",
        "1",
        "--key",
        str(key),
    ]
    first = start_peer("first", *common)
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]

    second = start_peer("second", *common, "--bootstrap", address)
    assert second.wait(timeout=90) == 1
    log = second.log_path.read_text()
    assert "uses our key" in log, second.log_tail()
    assert address.split("/p2p/")[0] in log  # names the other daemon's address
    assert first.process.poll() is None  # the first one runs on
