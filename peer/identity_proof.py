"""This peer's proof of identity work (transport/identity_work.py): mined once per key, kept beside it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from shoal.transport.identity_work import meets, mine

log = logging.getLogger(__name__)

WORK_FILE = "identity-work.json"


async def prove_identity(state_dir: Path, peer_id: str, bits: int, stopping: asyncio.Event) -> int | None:
    """The nonce that proves `bits` of work for `peer_id`, from the state directory or mined now (in a
    thread, so the daemon stays responsive); None if the daemon was asked to stop meanwhile."""
    path = state_dir / WORK_FILE
    try:
        saved = json.loads(path.read_text())
        nonce = saved.get("nonce") if saved.get("peer_id") == peer_id else None
        if isinstance(nonce, int) and meets(peer_id, nonce, bits):
            return nonce
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: mine it again
    if bits:
        log.info("proving this identity's work (%d bits: about %d hashes, once per key)", bits, 1 << bits)
    started = time.monotonic()
    found = await asyncio.to_thread(mine, peer_id, bits, lambda _: not stopping.is_set())
    if found is None:
        return None
    if bits:
        log.info("identity work proven in %.1f s", time.monotonic() - started)
    try:
        path.write_text(json.dumps({"peer_id": peer_id, "bits": bits, "nonce": found}))
    except OSError as error:
        log.warning("could not keep the identity work in %s (%s); it is mined again next start", path, error)
    return found
