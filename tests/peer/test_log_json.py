"""`--log-json`: every line on stderr and stdout is a JSON object, the worker's and stray writes included."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from shoal.peer.logs import JsonLines, JsonLogFormatter

from .conftest import REPO


def entries(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        entry = json.loads(line)  # every line, or the test fails here
        assert isinstance(entry, dict), line
        out.append(entry)
    return out


def test_json_lines_pass_json_and_wrap_everything_else_one_object_per_line():
    target = io.StringIO()
    stream = JsonLines(target, "stderr")
    stream.write('{"already": "json"}\nplain text\n\n   \nhalf a ')
    stream.write("line\rredrawn\r\n")
    stream.write("Error: something failed\n[1, 2]\nno newline at the end")
    assert not stream.isatty()
    with pytest.raises(TypeError):
        stream.write(b"bytes")  # type: ignore[arg-type]
    stream.close()
    got = entries(target.getvalue())
    assert got[0] == {"already": "json"}
    assert [(e["message"], e["level"], e["logger"]) for e in got[1:]] == [
        ("plain text", "WARNING", "stderr"),
        ("half a line", "WARNING", "stderr"),
        ("redrawn", "WARNING", "stderr"),
        ("Error: something failed", "ERROR", "stderr"),
        ("[1, 2]", "WARNING", "stderr"),  # JSON, but not an object
        ("no newline at the end", "WARNING", "stderr"),
    ]


def test_a_traceback_is_one_object():
    target = io.StringIO()
    stream = JsonLines(target, "shoal.peer.worker")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import traceback

        traceback.print_exc(file=stream)
    stream.write("after\n")
    got = entries(target.getvalue())
    assert len(got) == 3, got  # the message's second line is not indented: it ends the traceback early
    assert got[0]["level"] == "ERROR" and got[0]["message"] == "ValueError: bad"
    assert got[0]["exception"].startswith("Traceback (most recent call last):")
    assert [e["message"] for e in got[1:]] == ["value", "after"]


def test_log_records_with_exceptions_are_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and "RuntimeError: boom" in entry["exception"]


# In the worker: bytes written below Python's streams. In the daemon: plain text on both streams at exit.
SITECUSTOMIZE = """
import atexit, os, sys
if "shoal.peer.worker" in sys.orig_argv:
    os.write(2, b"raw bytes from below Python in the worker\\n")
elif "join" in sys.orig_argv:
    atexit.register(print, "plain text on stdout at exit")
    atexit.register(lambda: print("plain text on stderr at exit", file=sys.stderr))
"""


@pytest.mark.slow  # a real peer and its worker
def test_a_peer_with_log_json_writes_json_objects_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    args = "--run lj --listen 127.0.0.1:0 --rounds 2 --inner-steps 2 --model nano --threads 1 --log-json"
    run = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "join", *args.split(), "--state-dir", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
    )
    logged = entries(run.stderr)
    assert run.returncode == 0, logged[-5:]
    said = {(e["logger"], e["message"]) for e in logged}
    assert ("shoal.peer.worker", "raw bytes from below Python in the worker") in said
    assert ("stderr", "plain text on stderr at exit") in said
    assert any("started run lj" in message for _, message in said)
    assert any(logger == "shoal.peer" and "done" in message for logger, message in said)  # the event lines
    printed = {(e["logger"], e["message"]) for e in entries(run.stdout)}
    assert printed == {("stdout", "plain text on stdout at exit")}

    # click's own usage errors too
    bad = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.peer", "join", "--run", "lj", "--shard", "9/2", "--log-json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2
    assert any(e["level"] == "ERROR" and "shard" in e["message"] for e in entries(bad.stderr)), bad.stderr
