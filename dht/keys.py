"""Kademlia's key space: 256-bit ids, XOR distance, bucket indices (Kademlia paper, section 2.1).

Node ids are SHA-256 of the peer id bytes, so nobody chooses where they sit in the key space
without grinding hashes (S/Kademlia, section 4.1). Keys are plain ``bytes`` of length 32 on the
wire and in records; the routing and lookup code work on the ``int`` form for cheap XOR.
"""

import hashlib

from shoal.transport.identity import b58encode

KEY_BYTES = 32  # SHA-256 output: the key space is 2**256 as in the issue
KEY_BITS = KEY_BYTES * 8

# Domain tags keep the key of a run, of a record and of a node from ever colliding by construction.
_RUN_TAG = b"shoal/dht/run/v1\x00"
_RECORD_TAG = b"shoal/dht/record/v1\x00"


def node_id(peer_id: bytes) -> bytes:
    """The node id of a peer: SHA-256 of its peer id bytes."""
    return hashlib.sha256(peer_id).digest()


def run_key(run_id: str) -> bytes:
    """The key under which the peers of run `run_id` announce themselves as providers."""
    return hashlib.sha256(_RUN_TAG + run_id.encode()).digest()


def record_key(publisher: bytes, name: bytes) -> bytes:
    """The key of a value record: bound to its publisher, so nobody else can write under it."""
    return hashlib.sha256(_RECORD_TAG + len(publisher).to_bytes(2, "big") + publisher + name).digest()


def as_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def distance(a: bytes, b: bytes) -> int:
    """XOR distance between two keys (paper, section 2.1)."""
    return as_int(a) ^ as_int(b)


def bucket_index(own: int, other: int) -> int:
    """Index of the k-bucket that holds `other` in the table of `own`: bit length of the XOR, minus one.

    Bucket i holds ids at distance [2**i, 2**(i+1)); -1 means `other` is `own`.
    """
    return (own ^ other).bit_length() - 1


def short(peer_id: bytes) -> str:
    """A peer id for log lines: the tail of its base58 form (every Ed25519 id shares the head)."""
    return b58encode(peer_id)[-8:] if peer_id else "?"
