"""A volunteer's first hour: every failure a user can cause or meet ends in one line that names the cause and
says what to do, with a non-zero exit code and no traceback (the traceback only with --debug).

Each test starts a real `peer join` process, as a volunteer would, and reads what it printed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real peer processes

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE_BOUND_S = 15.0  # an unreachable bootstrap peer is given up within this (the daemon: 10 s)


def join(tmp_path: Path, *args: str, timeout: float = 120.0) -> tuple[int, str, float]:
    """Runs `peer join --run first-hour ARGS` to its end: exit code, stdout + stderr, seconds."""
    command = [sys.executable, "-P", "-m", "shoal.peer", "join", "--run", "first-hour", "--model", "nano"]
    if "--state-dir" not in args:
        args = (*args, "--state-dir", str(tmp_path / "state"))
    started = time.monotonic()
    result = subprocess.run(
        [*command, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error: ")]


def assert_one_line_failure(code: int, output: str, *words: str) -> str:
    """A non-zero exit, no traceback, and an `Error:` line holding every one of `words`."""
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], (word, output)
    return lines[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_bootstrap_fails_within_seconds_naming_the_address(tmp_path):
    address = f"/ip4/127.0.0.1/tcp/{closed_port()}"
    code, output, seconds = join(tmp_path, "--bootstrap", address)
    line = assert_one_line_failure(code, output, address, "connection refused", "firewall")
    assert seconds < UNREACHABLE_BOUND_S, (seconds, line)


def test_a_bootstrap_that_never_answers_fails_within_seconds(tmp_path):
    """Something listens (the kernel completes the TCP handshake) but never speaks: as a peer behind a
    dropped route or a hung process looks from outside."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}"
        code, output, seconds = join(tmp_path, "--bootstrap", address)
    line = assert_one_line_failure(code, output, address, "no answer")
    assert seconds < UNREACHABLE_BOUND_S, (seconds, line)


@pytest.mark.parametrize(
    ("address", "cause"),
    [
        ("/ip4/10.0.0/tcp/4701", "cannot be read"),
        ("/ip4/10.0.0.5/tcp/4701/p2p/not-a-peer-id", "cannot be read"),
        ("10.0.0.5:4701", "write it as /ip4/10.0.0.5/tcp/4701"),
    ],
)
def test_a_malformed_bootstrap_fails_at_once(tmp_path, address, cause):
    code, output, seconds = join(tmp_path, "--bootstrap", address)
    assert_one_line_failure(code, output, repr(address), cause)
    assert seconds < 10, seconds
    assert not (tmp_path / "state").exists()  # nothing started: no key, no state


def test_an_empty_data_folder_fails_before_anything_starts(tmp_path):
    (tmp_path / "corpus").mkdir()
    code, output, _ = join(tmp_path, "--data", str(tmp_path / "corpus"))
    assert_one_line_failure(code, output, str(tmp_path / "corpus"), "empty folder")
    assert "listening" not in output  # refused before the peer listened or announced anything
    assert not (tmp_path / "state").exists()


def test_a_binary_data_file_is_refused_by_name(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("plain text\n" * 200)
    (corpus / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)) * 8)
    code, output, _ = join(tmp_path, "--data", str(corpus))
    assert_one_line_failure(code, output, str(corpus / "model.safetensors"), "not text")
    assert "listening" not in output


def test_a_glob_that_matches_nothing_says_so(tmp_path):
    code, output, _ = join(tmp_path, "--data", str(tmp_path / "texts" / "*.txt"))
    assert_one_line_failure(code, output, "matches no file")


def test_a_single_text_file_trains(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(_some_text())
    code, output, _ = join(tmp_path, "--data", str(text), "--rounds", "1", "--inner-steps", "2")
    assert code == 0, output
    assert "Traceback" not in output and not error_lines(output), output
    assert (tmp_path / "state" / "checkpoint.pt").exists()


def test_a_quoted_glob_trains(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (texts / name).write_text(_some_text())
    (texts / "skipped.bin").write_bytes(bytes(1000))  # not matched: never read, never refused
    code, output, _ = join(tmp_path, "--data", str(texts / "*.txt"), "--rounds", "1", "--inner-steps", "2")
    assert code == 0, output
    assert "Traceback" not in output and not error_lines(output), output


def test_a_saved_hugging_face_dataset_trains(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is optional: pip install 'shoal[datasets]'")
    rows = [line for line in _some_text().splitlines() if line.strip()]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(tmp_path / "ds")
    code, output, _ = join(tmp_path, "--data", str(tmp_path / "ds"), "--rounds", "1", "--inner-steps", "2")
    assert code == 0, output
    assert "Traceback" not in output and not error_lines(output), output


def test_a_truncated_checkpoint_without_a_previous_one_starts_fresh_and_says_so_in_one_line(tmp_path):
    checkpoint = damaged_checkpoint(tmp_path / "state")
    text = tmp_path / "book.txt"
    text.write_text(_some_text())
    code, output, _ = join(tmp_path, "--data", str(text), "--rounds", "1", "--inner-steps", "2")
    assert code == 0, output
    assert "Traceback" not in output and not error_lines(output), output
    (line,) = [line for line in output.splitlines() if str(checkpoint) in line and "damaged" in line]
    assert "starting fresh" in line and "checkpoint.pt.rejected" in line, line
    assert (tmp_path / "state" / "checkpoint.pt.rejected").exists()  # set aside, never deleted
    assert (tmp_path / "state" / "checkpoint.pt").exists()


def test_debug_shows_the_workers_traceback_and_still_the_one_line(tmp_path):
    model = tmp_path / "not-a-model"  # a folder, so the command line takes it; the worker cannot load it
    model.mkdir()
    code, output, _ = join(tmp_path, "--model", f"hf:{model}", "--debug")
    assert code != 0
    assert "Traceback" in output, output
    assert "ModelError" in output  # the worker's own traceback came along
    (line,) = error_lines(output)
    assert str(model) in line


def damaged_checkpoint(state: Path) -> Path:
    """A checkpoint cut short, as a crash or a full disk in the middle of a copy leaves it."""
    import torch

    state.mkdir(parents=True)
    checkpoint = state / "checkpoint.pt"
    torch.save({"format": 2, "round": 3, "weights": torch.zeros(10_000)}, checkpoint)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    return checkpoint


def _some_text() -> str:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return (stdlib / "argparse.py").read_text(encoding="utf-8")


def test_sigterm_mid_round_stops_within_a_containers_grace_period_and_keeps_a_checkpoint(
    start_peer, tmp_path
):
    """Docker and systemd give a stopping peer 10 s before SIGKILL; a round of 400 inner steps takes far
    longer, so the worker must stop between inner steps rather than finish the round."""
    args = "--run stop --listen 127.0.0.1:0 --inner-steps 400 --threads 1"
    peer = start_peer("stopper", *args.split())
    peer.wait_for(lambda e: e["event"] == "progress")  # inside the first round's inner steps
    peer.process.send_signal(signal.SIGTERM)
    assert peer.wait(timeout=10) == 0, peer.log_tail()
    import torch

    saved = torch.load(tmp_path / "stopper" / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 0 and saved["round_steps"] > 0  # the inner steps done are kept


def test_joining_with_another_method_is_refused_before_any_weight_is_fetched(start_peer):
    first = start_peer(
        "creator", *["--run", "mix", "--listen", "127.0.0.1:0", "--inner-steps", "4", "--threads", "1"]
    )
    address = first.wait_for(lambda e: e["event"] == "listening")["address"]
    first.wait_for(lambda e: e["event"] == "round")  # the run is in progress: a joiner would fetch weights
    joiner = start_peer(
        "joiner", *f"--run mix --listen 127.0.0.1:0 --bootstrap {address} --method noloco --threads 1".split()
    )
    assert joiner.wait(timeout=120) != 0
    log = joiner.log_path.read_text()
    assert "Traceback" not in log, log
    assert "trains with method" in log and "join with --method" in log, log
    assert not joiner.of_kind("weights"), joiner.events
