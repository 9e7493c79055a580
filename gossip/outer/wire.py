"""The outer methods' message envelope: one msgpack map per peer per round, checked before use.

Shape: {"v": 2, "k": method, "o": origin peer, "r": round, "u": codec payload (sparse methods),
"t": [raw tensor bytes in sorted-name order] (dense methods), "c": consensus slice (V-B), "s": lattice steps
(V-C), "h": [lattice block checks per tensor, `check_bytes(n)` each] (V-C)}. Tensor bytes travel as raw
`bin`, never pickled; the receiver knows the layout (names, shapes) from its own slow weights, so sizes are
checked against that before any buffer is interpreted. Version 2 added "h" and V-C's dithered, symmetric
lattice code (a version-1 peer would misread a V-C message), docs/outer-methods.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import msgpack

from shoal.gossip.outer.errors import OuterMessageError

log = logging.getLogger(__name__)

WIRE_VERSION = 2
# A GPT-2-small model in fp32 is ~0.35 GB; one dense message must fit, anything beyond is hostile.
MAX_OUTER_MESSAGE_BYTES = 1 << 30
# Tensor lists are per named parameter; real models have at most a few thousand.
MAX_TENSORS = 1 << 16
# Peer ids are libp2p PeerIDs (~52 chars base58); method names are short.
MAX_STR_LEN = 256


# V-C: one 16-bit check per block of this many lattice values (0.0625 bits per value; gossip/outer/quant.py).
CHECK_BLOCK = 256


def packed_bits(count: int, bits: int) -> int:
    """Wire size in bytes of `count` codes of `bits` bits each when bit-packed (what a peer would send)."""
    return (count * bits + 7) // 8


def check_bytes(count: int) -> int:
    """Bytes of the lattice block checks of a tensor of `count` values: 2 per block of CHECK_BLOCK."""
    return 2 * ((count + CHECK_BLOCK - 1) // CHECK_BLOCK)


@dataclass
class Message:
    kind: str
    origin: str
    round: int
    update: bytes | None = None  # codec payload
    tensors: list[bytes] = field(default_factory=list)  # dense tensors, sorted-name order
    consensus: dict | None = None  # V-B consensus slice: {"i": slice index, "s": [scales], "q": [codes]}
    steps: list[float] = field(default_factory=list)  # V-C lattice step per tensor
    checks: list[bytes] = field(default_factory=list)  # V-C lattice block checks per tensor

    @property
    def id(self) -> tuple[str, int]:
        return (self.origin, self.round)


def pack(message: Message) -> bytes:
    body: dict = {"v": WIRE_VERSION, "k": message.kind, "o": message.origin, "r": message.round}
    if message.update is not None:
        body["u"] = message.update
    if message.tensors:
        body["t"] = message.tensors
    if message.consensus is not None:
        body["c"] = message.consensus
    if message.steps:
        body["s"] = message.steps
    if message.checks:
        body["h"] = message.checks
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes, kind: str) -> Message:
    """Parse one message of method `kind`; raise OuterMessageError on anything unexpected."""
    if len(data) > MAX_OUTER_MESSAGE_BYTES:
        raise OuterMessageError(
            f"outer message of {len(data)} bytes exceeds MAX_OUTER_MESSAGE_BYTES={MAX_OUTER_MESSAGE_BYTES}"
        )
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_OUTER_MESSAGE_BYTES,
            max_str_len=MAX_STR_LEN,
            max_array_len=MAX_TENSORS,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise OuterMessageError(f"outer message is not a valid bounded msgpack map: {exc}") from exc
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
        raise OuterMessageError(
            f"outer message has version {body.get('v') if isinstance(body, dict) else None!r}, "
            f"this peer speaks {WIRE_VERSION}; upgrade the older peer"
        )
    if body.get("k") != kind:
        raise OuterMessageError(f"outer message is for method {body.get('k')!r}, this run uses {kind!r}")
    origin, round_ = body.get("o"), body.get("r")
    if not isinstance(origin, str) or not isinstance(round_, int) or round_ < 0:
        raise OuterMessageError("outer message lacks a valid origin (str) and round (int >= 0)")
    update = body.get("u")
    tensors = body.get("t", [])
    consensus = body.get("c")
    steps = body.get("s", [])
    checks = body.get("h", [])
    if update is not None and not isinstance(update, bytes):
        raise OuterMessageError("outer message field 'u' must be bytes")
    if not isinstance(tensors, list) or not all(isinstance(t, bytes) for t in tensors):
        raise OuterMessageError("outer message field 't' must be a list of bytes")
    if consensus is not None and not isinstance(consensus, dict):
        raise OuterMessageError("outer message field 'c' must be a map")
    if not isinstance(steps, list) or not all(isinstance(s, float) for s in steps):
        raise OuterMessageError("outer message field 's' must be a list of floats")
    if not isinstance(checks, list) or not all(isinstance(h, bytes) for h in checks):
        raise OuterMessageError("outer message field 'h' must be a list of bytes")
    return Message(kind, origin, round_, update, tensors, consensus, steps, checks)
