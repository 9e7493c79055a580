"""Identities that cost something to mint: a proof of work bound to a peer id (S/Kademlia's crypto puzzle,
in its cheap-to-check form).

A peer id joins a run's membership only with a nonce such that sha256("shoal-work/1" | peer id | nonce)
starts with `bits` zero bits. A volunteer pays once per key (about 2^bits hashes: 20 bits is a few
seconds of one core in Python, kept in the state directory), an attacker pays it again for every
identity it mints, and a receiver checks it with one hash, so checking costs nothing to be flooded with.
It is a speed bump, not a wall: sha256 on a GPU is fast. Closed runs (join tokens) are the wall.

The DHT places a node by the same digest (`dht.keys.node_id`), so the nonce a peer mines once serves both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeGuard

DOMAIN = b"shoal-work/1"
MAX_BITS = 32  # beyond this a volunteer would wait hours
NONCE_BYTES = 8
CHUNK = 1 << 16  # hashes between two calls of `between_chunks` while mining


def _prefix(peer_id: str) -> hashlib._Hash:
    return hashlib.sha256(DOMAIN + peer_id.encode())


def _zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest[:8], "big")
    return 64 - value.bit_length()


def valid_nonce(nonce: object) -> TypeGuard[int]:
    return isinstance(nonce, int) and not isinstance(nonce, bool) and 0 <= nonce < 1 << (8 * NONCE_BYTES)


def digest(peer_id: str, nonce: int) -> bytes:
    """sha256("shoal-work/1" | peer id | nonce): its leading zero bits are the work `nonce` proves."""
    hasher = _prefix(peer_id)
    hasher.update(nonce.to_bytes(NONCE_BYTES, "little"))
    return hasher.digest()


def meets(peer_id: str, nonce: int, bits: int) -> bool:
    """True when `nonce` proves `bits` of work for `peer_id`."""
    if bits <= 0:
        return True
    if not valid_nonce(nonce):
        return False
    return _zero_bits(digest(peer_id, nonce)) >= bits


def mine(peer_id: str, bits: int, between_chunks: Callable[[int], bool] | None = None) -> int | None:
    """The first nonce that proves `bits` of work for `peer_id`; None if `between_chunks(tried)` (called
    every CHUNK hashes) returned False, i.e. the caller gave up."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"identity work must be 0..{MAX_BITS} bits, got {bits}")
    if bits == 0:
        return 0
    prefix = _prefix(peer_id)
    start = 0
    while True:
        for nonce in range(start, start + CHUNK):
            hasher = prefix.copy()
            hasher.update(nonce.to_bytes(NONCE_BYTES, "little"))
            if _zero_bits(hasher.digest()) >= bits:
                return nonce
        start += CHUNK
        if between_chunks is not None and not between_chunks(start):
            return None
