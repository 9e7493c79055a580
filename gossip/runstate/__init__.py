"""The run's shared state: owner-written pycrdt documents in signed envelopes, synced by anti-entropy.

Public API: `RunState` (read API, local changes, `on_message` / `tick` hooks), `store.save` /
`store.load` for persistence, and the value types below.
"""

from .envelope import KIND_PEER, KIND_RUN, public_bytes
from .errors import NotAuthorized, Rejected, RunStateError
from .state import Checkpoint, Liveness, Member, Outgoing, RunState

__all__ = [
    "KIND_PEER",
    "KIND_RUN",
    "Checkpoint",
    "Liveness",
    "Member",
    "NotAuthorized",
    "Outgoing",
    "Rejected",
    "RunState",
    "RunStateError",
    "public_bytes",
]
