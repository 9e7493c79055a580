"""`/ipfs/id/1.0.0`: tell a peer our listen addresses, the address we see it at, and our protocols.

Spec: https://github.com/libp2p/specs/blob/master/identify/README.md. The side that accepts the stream
writes one Identify protobuf (varint-length-prefixed, as go-libp2p and py-libp2p >= 0.2 do) and closes.
The reader also accepts the older raw form (no prefix, ended by the stream's close).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import ProtocolError
from .identity import PeerID, PublicKey
from .multiaddr import Multiaddr
from .protobuf import encode_len_field, iter_fields
from .varint import decode_uvarint, encode_uvarint

PROTOCOL_ID = "/ipfs/id/1.0.0"
PROTOCOL_VERSION = "ipfs/0.1.0"
AGENT_VERSION = "shoal/0.1.0"
# go-libp2p caps identify messages at 8 KiB of protobuf plus signed records; 64 KiB leaves room for long
# address lists and refuses a peer trying to make us buffer megabytes.
MAX_IDENTIFY_SIZE = 64 * 1024
# Addresses and protocols kept from one message: more is either a misconfiguration or an attack.
MAX_ADDRS = 64
MAX_PROTOCOLS = 256
MAX_PROTOCOL_LENGTH = 1024

log = logging.getLogger(__name__)


@dataclass
class IdentifyInfo:
    public_key: PublicKey | None = None
    listen_addrs: list[Multiaddr] = field(default_factory=list)
    observed_addr: Multiaddr | None = None
    protocols: list[str] = field(default_factory=list)
    protocol_version: str = ""
    agent_version: str = ""

    def encode(self) -> bytes:
        out = bytearray()
        if self.public_key is not None:
            out += encode_len_field(1, self.public_key.to_protobuf())
        for addr in self.listen_addrs:
            out += encode_len_field(2, addr.to_bytes())
        for proto in self.protocols:
            out += encode_len_field(3, proto.encode())
        if self.observed_addr is not None:
            out += encode_len_field(4, self.observed_addr.to_bytes())
        out += encode_len_field(5, self.protocol_version.encode())
        out += encode_len_field(6, self.agent_version.encode())
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> IdentifyInfo:
        info = cls()
        for number, value in iter_fields(data):
            if not isinstance(value, bytes):
                continue
            if number == 1:
                info.public_key = PublicKey.from_protobuf(value)
            elif number == 2 and len(info.listen_addrs) < MAX_ADDRS:
                addr = _parse_addr(value)
                if addr is not None:
                    info.listen_addrs.append(addr)
            elif number == 3 and len(info.protocols) < MAX_PROTOCOLS and len(value) <= MAX_PROTOCOL_LENGTH:
                info.protocols.append(value.decode(errors="replace"))
            elif number == 4:
                info.observed_addr = _parse_addr(value)
            elif number == 5:
                info.protocol_version = value[:MAX_PROTOCOL_LENGTH].decode(errors="replace")
            elif number == 6:
                info.agent_version = value[:MAX_PROTOCOL_LENGTH].decode(errors="replace")
        return info

    def check_sender(self, peer_id: PeerID) -> None:
        if self.public_key is not None and self.public_key.peer_id() != peer_id:
            raise ProtocolError(f"identify from {peer_id} carries another peer's public key")


def _parse_addr(raw: bytes) -> Multiaddr | None:
    try:
        return Multiaddr.from_bytes(raw)
    except ProtocolError as exc:  # e.g. a transport we do not know: skip that address only
        log.debug("skipping an identify address we cannot parse: %s", exc)
        return None


def frame(info: IdentifyInfo) -> bytes:
    body = info.encode()
    return encode_uvarint(len(body)) + body


def unframe(data: bytes) -> IdentifyInfo:
    """Decode what the identify responder wrote before closing: prefixed or (older peers) raw."""
    if len(data) > MAX_IDENTIFY_SIZE:
        raise ProtocolError(f"identify message of {len(data)} bytes exceeds {MAX_IDENTIFY_SIZE}")
    try:
        prefix = decode_uvarint(data)
    except ProtocolError:
        prefix = None
    if prefix is not None and prefix[1] + prefix[0] == len(data):
        return IdentifyInfo.decode(data[prefix[1] :])
    return IdentifyInfo.decode(data)
