"""Checkpoints on disk: written every round in the background, atomically, with the previous one kept.

The files in a peer's state directory:
    checkpoint.pt           the latest: after a round, or when the worker stopped in the middle of one
    checkpoint.pt.prev      the one before it; a resume falls back to it when the latest cannot be used
    checkpoint.pt.rejected  a checkpoint a resume could not use (damaged, another model), moved aside
    optimizer-N.pt          the inner optimizer's state a round's checkpoint names (the newest few kept)
A write goes to a temporary file in the same folder, is fsynced, and only then renames the latest to
`.prev` and itself to the latest, so a crash at any point leaves at least one whole checkpoint.

A round's checkpoint is written while the next round trains, so it must not read what training changes.
The inner optimizer's moments (two models' worth) change in place at every inner step; rather than copy
them, the worker writes them to a file of their own while the daemon swaps the round (`write_optimizer`),
when nothing changes them, and the checkpoint that follows names that file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from shoal.errors import ShoalError

log = logging.getLogger("shoal.peer.worker")

PREVIOUS = ".prev"
REJECTED = ".rejected"
OPTIMIZER_FILE = re.compile(r"optimizer-\d{1,24}\.pt")
OPTIMIZER_FILES_KEPT = 3  # the latest checkpoint's, the previous one's, and one to spare


class Resumable(Protocol):
    """What `resume` needs of the worker's Trainer (peer/worker/train.py, which imports this module)."""

    round: int

    def load(self, path: Path) -> None: ...


class CheckpointError(ShoalError):
    """A checkpoint cannot be read, belongs to another model, or cannot be written."""


def previous_of(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS)


def write_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Writes `state` to `path` atomically (temporary file, fsync, rename); the old `path` becomes `.prev`
    (with `keep_previous`)."""
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
        if keep_previous and path.exists():  # only once the new one is whole: never without a usable one
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write (a full disk, a file-size limit) as a RuntimeError of its own
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and _write_failed(error)):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise CheckpointError(
                f"cannot write the checkpoint {path}: {reason.splitlines()[0][:200]} ({_free(path.parent)} "
                "free there); free some disk space or choose another --state-dir"
            ) from error
        raise


def _write_failed(error: RuntimeError) -> bool:
    """Is this torch.save's RuntimeError for a write that did not go through (its zip writer's words)?"""
    text = str(error)
    return any(words in text for words in ("failed writing", "unexpected pos", "file write failed"))


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MB"
    except OSError:
        return "unknown space"


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
        """Writes `state`, which must be the worker's own copy (Trainer.state_dict): it is read meanwhile.
        Then removes the optimizer files older than the newest OPTIMIZER_FILES_KEPT."""
        self.wait()
        if not background:
            write_checkpoint(self.path, state)
            self._prune()
            return
        self._start(self._write, state)

    def write_optimizer(self, state: dict[str, Any]) -> str:
        """Starts writing an optimizer's state dict (its own tensors, not a copy: the caller changes none of
        them before the next `write` or `wait`) to a new file beside the checkpoint; returns the file's name,
        for the checkpoint that follows (Trainer.state_dict(optimizer_file=...))."""
        self.wait()
        name = f"optimizer-{time.time_ns()}.pt"
        self._start(self._write_to, self.path.with_name(name), state)
        return name

    def _start(self, target: Any, *args: Any) -> None:
        self._thread = threading.Thread(target=target, args=args, name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        self._write_to(self.path, state)
        self._prune()

    def _write_to(self, path: Path, state: dict[str, Any]) -> None:
        try:
            write_checkpoint(path, state, keep_previous=path == self.path)
        except Exception as error:  # handed to the main thread, which stops the worker with it
            self._error = error

    def _prune(self) -> None:
        """Optimizer files no checkpoint can name any more (a checkpoint names the newest when written)."""
        files = sorted(
            (f for f in self.path.parent.glob("optimizer-*.pt") if OPTIMIZER_FILE.fullmatch(f.name)),
            key=lambda f: int(f.name[len("optimizer-") : -len(".pt")]),
        )
        for old in files[:-OPTIMIZER_FILES_KEPT]:
            old.unlink(missing_ok=True)

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
    for pattern in (f"{path.name}*.tmp", "optimizer-*.pt*.tmp"):  # writes cut short by SIGKILL or a crash
        for stale in path.parent.glob(pattern):
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


def load_optimizer_file(checkpoint: Path, name: object) -> dict[str, Any]:
    """The optimizer state a checkpoint names; CheckpointError when the name is not one of ours, or the
    file is missing or damaged (the resume then falls back, as for a damaged checkpoint)."""
    if not isinstance(name, str) or not OPTIMIZER_FILE.fullmatch(name):
        raise CheckpointError(f"the checkpoint {checkpoint} names no optimizer file ({str(name)[:60]!r})")
    path = checkpoint.with_name(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"the optimizer state {path} of {checkpoint} is missing") from error
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise CheckpointError(f"the optimizer state {path} is damaged ({reason})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"the optimizer state {path} is damaged (not a state dict)")
    return state


def _set_aside(path: Path) -> str:
    target = path.with_name(path.name + REJECTED)
    try:
        os.replace(path, target)
    except OSError as error:
        return f"could not move it aside ({error.strerror or error})"
    return f"moved aside to {target.name}"
