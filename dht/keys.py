"""Kademlia's key space: 256-bit ids, XOR distance, bucket indices (Kademlia paper, section 2.1).

A node id is the hash of the peer's identity-work digest (transport/identity_work.py), and the DHT
takes only contacts whose nonce proves DHT_WORK_BITS of work (S/Kademlia's static crypto puzzle, section
4.1). Placing a node within p bits of a key therefore costs about 2^(DHT_WORK_BITS + p) hashes: with the
id a plain hash of the peer id it cost 2^p key generations, seconds of one core to sit next to a run's key
in a thousand-node network and answer every lookup for it. Keys are plain ``bytes`` of length 32 on the
wire and in records; the routing and lookup code work on the ``int`` form for cheap XOR.
"""

import hashlib

from shoal.transport.identity import b58encode
from shoal.transport.identity_work import digest

KEY_BYTES = 32  # SHA-256 output: the key space is 2**256 as in the issue
KEY_BITS = KEY_BYTES * 8

# Domain tags keep the key of a run, of a record and of a node from ever colliding by construction.
_RUN_TAG = b"shoal/dht/run/v1\x00"
_RECORD_TAG = b"shoal/dht/record/v1\x00"
_NODE_TAG = b"shoal/dht/node/v2\x00"
# Identity work every DHT contact proves: about 65,000 hashes once per key (0.07 s of one core), while an
# id chosen near a key costs 2^16 times what it did. The whole network must agree on it; a run asks for
# its own bits on top (`peer join --identity-bits`, 20 by default), and one nonce proves both.
DHT_WORK_BITS = 16


def node_id(peer_id: bytes, work: int = 0) -> bytes:
    """The node id of a peer: SHA-256 over the digest its identity-work nonce `work` proves (hashed again,
    so that ids spread evenly over the key space instead of sharing the proof's leading zeros)."""
    return hashlib.sha256(_NODE_TAG + digest(b58encode(peer_id), work)).digest()


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
