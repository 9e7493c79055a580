"""Checkpoints on disk: written every round in the background, atomically, with the previous one kept.

The files in a peer's state directory:
    checkpoint.pt           the latest: after a round, or when the worker stopped in the middle of one
    checkpoint.pt.prev      the one before it; a resume falls back to it when the latest cannot be used
    checkpoint.pt.rejected  a checkpoint a resume could not use (damaged, another model), moved aside
A write goes to a temporary file in the same folder, is fsynced, and only then renames the latest to
`.prev` and itself to the latest, so a crash at any point leaves at least one whole checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from shoal.errors import ShoalError

log = logging.getLogger("shoal.peer.worker")

PREVIOUS = ".prev"
REJECTED = ".rejected"


class Resumable(Protocol):
    """What `resume` needs of the worker's Trainer (peer/worker/train.py, which imports this module)."""

    round: int

    def load(self, path: Path) -> None: ...


class CheckpointError(ShoalError):
    """A checkpoint cannot be read, belongs to another model, or cannot be written."""


def previous_of(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes `state` to `path` atomically (temporary file, fsync, rename); the old `path` becomes `.prev`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as error:
        raise CheckpointError(f"cannot write the checkpoint {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():  # only once the new one is whole: never a moment without a usable checkpoint
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"cannot write the checkpoint {path}: {error.strerror or error}; free some disk space or "
                "choose another --state-dir"
            ) from error
        raise


def _fsync_folder(folder: Path) -> None:
    """Makes the renames durable (POSIX); some file systems cannot open a folder, which costs nothing here."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointWriter:
    """Writes checkpoints one at a time, each in a background thread, so that training goes on meanwhile.

    Every write first waits for the one before it (the renames must happen in order); `close()` waits
    for the last one, so no thread outlives the worker. A failed background write is raised by the next
    `write()` or `wait()`."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def write(self, state: dict[str, Any], background: bool = True) -> None:
        """Writes `state`, which must be the worker's own copy (Trainer.state_dict): it is read meanwhile."""
        self.wait()
        if not background:
            write_checkpoint(self.path, state)
            return
        self._thread = threading.Thread(target=self._write, args=(state,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        try:
            write_checkpoint(self.path, state)
        except Exception as error:  # handed to the main thread, which stops the worker with it
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Waits for the write in progress; an error nobody collected is logged (the worker is ending)."""
        try:
            self.wait()
        except Exception as error:  # the worker is already stopping on another error: say this one too
            log.error("worker: %s", error)


def resume(trainer: Resumable, path: Path) -> None:
    """Loads the newest usable checkpoint into `trainer`: `path`, else its `.prev`, else none (the trainer
    stays fresh and the daemon gives it the run's weights). A checkpoint that cannot be used is moved
    aside (`.rejected`, never deleted) and the fallback is said in one log line."""
    for stale in path.parent.glob(f"{path.name}*.tmp"):  # a write cut short by SIGKILL or a crash
        stale.unlink(missing_ok=True)
    candidates = [c for c in (path, previous_of(path)) if c.exists()]
    rejected: list[str] = []
    for candidate in candidates:
        try:
            trainer.load(candidate)
        except CheckpointError as error:
            rejected.append(f"{error}; {_set_aside(candidate)}")
            continue
        if candidate == path:
            log.info("resumed from %s at round %d", path, trainer.round)
        elif rejected:
            log.warning("%s; resumed from the previous checkpoint, %s, at round %d",
                        "; ".join(rejected), candidate.name, trainer.round)  # fmt: skip
        else:  # a crash between the two renames of a write
            log.warning("no checkpoint %s; resumed from the previous checkpoint, %s, at round %d",
                        path, candidate.name, trainer.round)  # fmt: skip
        return
    if rejected:
        log.warning("%s; starting fresh: the peer takes the run's weights from a member", "; ".join(rejected))


def _set_aside(path: Path) -> str:
    target = path.with_name(path.name + REJECTED)
    try:
        os.replace(path, target)
    except OSError as error:
        return f"could not move it aside ({error.strerror or error})"
    return f"moved aside to {target.name}"
