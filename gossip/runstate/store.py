"""Persistence of a `RunState` to a directory: one msgpack file, replaced atomically.

What is on disk is checked on load exactly like bytes from a peer (signatures, chains, limits), and a
restarted peer always starts a new generation of its own documents, so it never writes under a Yjs
client id whose state it may have lost.
"""

import logging
import os
import random
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import RunStateError
from .limits import MAX_CHAIN_ENTRIES, MAX_DOCUMENTS, MAX_ENTRY_BYTES
from .state import RunState

log = logging.getLogger(__name__)

FILE_NAME = "runstate.msgpack"
# Every document's chain at its hard cap of full-size entries would be far larger; a real run's file
# is a few MB. 256 MiB refuses a corrupt or planted file before reading it into memory.
MAX_FILE_BYTES = 256 << 20
_MAX_ITEMS = MAX_DOCUMENTS * MAX_CHAIN_ENTRIES


def save(state: RunState, directory: str | os.PathLike[str]) -> Path:
    """Write the state to `directory` (created if needed): temp file, fsync, rename."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / FILE_NAME
    tmp = d / (FILE_NAME + ".tmp")
    data = msgpack.packb(state.export())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)
    return path


def load(
    directory: str | os.PathLike[str],
    key: Ed25519PrivateKey,
    run_id: bytes,
    creator: bytes,
    now: float,
    *,
    rng: random.Random | None = None,
) -> RunState:
    """The saved state of this run and key, or a fresh one if there is none.

    The caller should `save` right after: the new generation number is then on disk before anything
    written under it leaves the process.
    """
    path = Path(directory) / FILE_NAME
    if not path.exists():
        return RunState(key, run_id, creator, now, rng=rng)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RunStateError(
            f"{path} is {size} bytes, over {MAX_FILE_BYTES}; it is not a run state file, move it"
        )
    try:
        blob = msgpack.unpackb(
            path.read_bytes(),
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_ENTRY_BYTES,
            max_str_len=64,
            max_array_len=_MAX_ITEMS,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise RunStateError(
            f"{path} is not a readable run state file ({exc}); move it away to start fresh"
        ) from exc
    if not isinstance(blob, dict):
        raise RunStateError(f"{path} does not hold a run state map; move it away to start fresh")
    state = RunState.restore(blob, key, run_id, creator, now, rng=rng)
    log.info("runstate: loaded %d documents from %s", len(state.docs), path)
    return state
