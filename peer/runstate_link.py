"""The daemon's shell around the run's CRDT state (gossip/runstate): streams in, streams out, a clock.

RunState names peers by their raw Ed25519 public keys; the transport names them by PeerID, which for
Ed25519 inlines that key, so the two convert without a lookup. Messages travel one per stream on
RUNSTATE_PROTOCOL, length-prefixed; the state is saved after local changes and periodically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.gossip.runstate import Outgoing, RunStateError, public_bytes
from shoal.gossip.runstate import store as runstate_store
from shoal.gossip.runstate.limits import MAX_SYNC_MESSAGE_BYTES
from shoal.transport.errors import TransportError
from shoal.transport.host import Host, Stream
from shoal.transport.identity import KEY_TYPE_ED25519, PeerID
from shoal.transport.messages import MessageError, read_frame, write_message

log = logging.getLogger(__name__)

RUNSTATE_PROTOCOL = "/shoal/runstate/1.0.0"
SEND_TIMEOUT = 5.0
TICK_INTERVAL = 1.0
SAVE_INTERVAL = 30.0
MAX_SENDS_IN_FLIGHT = 16  # a tick's burst of pushes is bounded; the rest waits for the next tick


def key_of(peer_id: str) -> bytes | None:
    """The raw Ed25519 key inlined in a PeerID, or None for other key types."""
    public = PeerID.from_string(peer_id).public_key()
    return public.data if public is not None and public.key_type == KEY_TYPE_ED25519 else None


def peer_id_of(key: bytes) -> PeerID:
    return PeerID.from_public_key(ed25519.Ed25519PublicKey.from_public_bytes(key))


class RunStateLink:
    def __init__(
        self,
        host: Host,
        key: ed25519.Ed25519PrivateKey,
        run_id: str,
        creator_peer_id: str,
        directory: Path,
        reach: Callable[[PeerID], Awaitable[object]],
    ):
        creator = key_of(creator_peer_id)
        if creator is None:
            raise RunStateError(f"the run's creator {creator_peer_id} has no Ed25519 key")
        self.host = host
        self.directory = directory
        self.reach = reach  # connects to a peer by whatever path works (the daemon's NAT layer)
        self.creator_peer_id = creator_peer_id
        self.state = runstate_store.load(directory, key, run_id.encode(), creator, time.time())
        self.me = public_bytes(key)
        self._sends = asyncio.Semaphore(MAX_SENDS_IN_FLIGHT)
        self._tasks: set[asyncio.Task] = set()
        runstate_store.save(self.state, directory)  # a new generation is on disk before we write with it

    # --- local changes --------------------------------------------------------------------------------
    def apply(self, outgoing: list[Outgoing]) -> None:
        """Sends what a local change or a tick produced, without waiting for it."""
        for item in outgoing:
            task = asyncio.create_task(self._send(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def change(self, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            self.apply(getattr(self.state, method)(*args, **kwargs))
        except RunStateError as error:
            log.warning("run state: %s refused: %s", method, error)

    def add_peers(self, peer_ids: list[str]) -> None:
        self.state.add_peers(k for k in map(key_of, peer_ids) if k is not None and k != self.me)

    # --- the network ----------------------------------------------------------------------------------
    async def _send(self, item: Outgoing) -> None:
        peer = peer_id_of(item.dest)
        async with self._sends:
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.reach(peer)
                    stream = await self.host.new_stream(peer, RUNSTATE_PROTOCOL)
                    await write_message(stream, {"d": item.data})
                    await stream.close()
            except (TransportError, OSError, TimeoutError) as error:
                log.debug("run state: could not reach %s: %s", peer.short(), error)

    async def serve(self, stream: Stream) -> None:
        sender = stream.remote_peer_id
        key = key_of(str(sender))
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                message, _ = await read_frame(stream, MAX_SYNC_MESSAGE_BYTES + 64)
            data = message.get("d")
            if key is None or not isinstance(data, bytes):
                raise MessageError("a run-state message is a map {d: bytes} from an Ed25519 peer")
            self.apply(self.state.on_message(key, data, time.time()))
            await stream.close()
        except (MessageError, asyncio.IncompleteReadError, TransportError, TimeoutError) as error:
            log.warning("run state: dropped a message from %s: %s", sender.short(), error)
            await stream.reset()

    async def run_forever(self) -> None:
        last_save = time.monotonic()
        while True:
            self.apply(self.state.tick(time.time()))
            if time.monotonic() - last_save > SAVE_INTERVAL:
                self.save()
                last_save = time.monotonic()
            await asyncio.sleep(TICK_INTERVAL)

    def save(self) -> None:
        runstate_store.save(self.state, self.directory)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.save()

    # --- the read API, as plain data for the REPL --------------------------------------------------
    def view(self) -> dict[str, Any]:
        now, manifest = time.time(), self.state.manifest()
        return {
            "creator": self.creator_peer_id,
            "config": self.state.config(),
            "members": [
                {
                    "peer_id": str(peer_id_of(m.key)),
                    "addrs": m.addrs,
                    "round": m.round,
                    "liveness": str(m.liveness),
                    "metrics": m.metrics,
                }
                for m in self.state.members(now)
            ],
            "bans": {str(peer_id_of(k)): reason for k, reason in self.state.bans().items()},
            "excluded": {str(peer_id_of(k)): reason for k, reason in self.state.excluded().items()},
            "manifest": None if manifest is None else dataclasses.asdict(manifest),
            "size_bytes": self.state.size_bytes(),
        }
