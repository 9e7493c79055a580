"""The worker's slow weights after each round, as files its daemon streams to peers joining the run.

Each round's φ (little-endian fp32 in model order, `Trainer.slow_chunks`) goes to `weights-ROUND.bin` in the
peer's state directory, written under a temporary name and renamed, so that no reader sees half a file. The
worker keeps the last KEEP_SNAPSHOTS and unlinks older ones. The daemon opens each file when told of it and
streams it from disk (peer/weights.py): a file it holds open outlives the unlink, so a fetch in progress
reads one round's weights to its end, and neither process keeps a copy of the model in memory for joiners.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

KEEP_SNAPSHOTS = 3  # on disk: the daemon holds the last 2 open, one more covers the message in flight
PREFIX, SUFFIX = "weights-", ".bin"


def snapshot_path(directory: Path, round_: int) -> Path:
    return directory / f"{PREFIX}{round_:08d}{SUFFIX}"


def write_snapshot(directory: Path, round_: int, chunks: Iterable[bytes | memoryview]) -> tuple[Path, int]:
    """Writes round `round_`'s weights, given a piece at a time (no model-sized buffer); returns the file
    and its size. No hash: replicas differ, and a joiner checks the values against other members
    (peer/join_fetch.py). Unlinks the files of rounds before the last KEEP_SNAPSHOTS, and any of later
    rounds (left by an earlier life of this peer)."""
    path = snapshot_path(directory, round_)
    partial = path.with_suffix(".partial")
    nbytes = 0
    with open(partial, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            nbytes += len(chunk)
    os.replace(partial, path)
    for other in directory.glob(f"{PREFIX}*{SUFFIX}"):
        number = other.name[len(PREFIX) : -len(SUFFIX)]
        if not number.isdigit() or not round_ - KEEP_SNAPSHOTS < int(number) <= round_:
            other.unlink(missing_ok=True)
    return path, nbytes
