"""What the benchmarks that run real `peer join` processes from one or more checkouts share (bench.link,
bench.join_memory): the tree each measurement ran, its peers' environment, their events, the wall-clock
guard."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """A measurement could not be made: a peer failed or was too slow, or a tree runs the wrong code."""


def _git(path: Path, *argv: str) -> str:
    return subprocess.run(
        ["git", "--no-optional-locks", "-C", str(path), *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def tree_label(path: Path) -> str:
    """The tree's short commit, `+dirty` when tracked files are modified; `?` outside a git checkout."""
    try:
        commit = _git(path, "rev-parse", "--short", "HEAD").strip()
        dirty = _git(path, "status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return commit + ("+dirty" if dirty else "")


def tree_env(code: Path | None) -> dict[str, str]:
    """The peers' environment: a fast identity proof, and `code`'s package ahead of the editable install
    (checked here: a tree that imports another's code would measure the wrong one)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SHOAL_IDENTITY_BITS"] = "8"
    env["PYTHONUNBUFFERED"] = "1"
    if code is not None:
        env["PYTHONPATH"] = str(code)
    root = code or REPO_ROOT
    probe = [sys.executable, "-P", "-c", "import shoal; print(shoal.__file__)"]
    where = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=root, timeout=60)
    if where.returncode != 0 or not Path(where.stdout.strip()).resolve().is_relative_to(root.resolve()):
        raise BenchError(f"from {root}, `import shoal` found {where.stdout.strip() or where.stderr.strip()}")
    return env


def parse_code(values: list[str], bench: str) -> list[Path]:
    """The `--code` trees (repeatable, or comma lists), each checked to hold a shoal package."""
    paths = [Path(p.strip()).resolve() for value in values for p in value.split(",") if p.strip()]
    for path in paths:
        if not (path / "shoal" / "__init__.py").is_file():
            raise SystemExit(f"{bench}: --code {path}: no shoal package there")
    return paths


def run_guarded(bench: str, guard_s: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()` under a wall-clock guard (a hung run raises TimeoutError) with SIGTERM turned into
    KeyboardInterrupt, so that either unwinds through the finally blocks that stop the peers; the result
    gets `wall_s`."""

    def _guard(*_: object) -> None:
        raise TimeoutError(f"{bench} passed its {guard_s} s wall-clock guard")

    def _terminated(*_: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGALRM, _guard)
    signal.signal(signal.SIGTERM, _terminated)
    signal.alarm(guard_s)
    started = time.monotonic()
    try:
        result = run()
    finally:
        signal.alarm(0)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def pump_events(
    stdout: Iterable[str], log: TextIO, deliver: Callable[[dict[str, Any]], None], stamp: bool = False
) -> None:
    """Until the process's stdout ends: every line copied to `log` (flushed: a killed run keeps it), every
    JSON object handed to `deliver` (with `t`, the time it was read, when `stamp` and it has none)."""
    with contextlib.suppress(ValueError, OSError):  # the pipe or the log closed under us: the run is over
        for line in stdout:
            log.write(line)
            log.flush()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                if stamp:
                    event.setdefault("t", time.time())
                deliver(event)


def write_json(result: dict[str, Any], path: str) -> None:
    """A benchmark's result as JSON at `path`, its folder made if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
