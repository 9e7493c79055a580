"""Multiaddrs: self-describing network addresses (`/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...`).

Spec: https://github.com/multiformats/multiaddr. Both forms are supported: the text form people type and
the binary form that travels in identify messages. Only the protocols Shoal meets are known; a binary
address with an unknown code is refused (callers skip such addresses rather than fail).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import MultiaddrError, ProtocolError
from .identity import PeerID
from .varint import decode_uvarint, encode_uvarint

# (code, name, size in bits: >0 fixed, -1 varint-length-prefixed, 0 none), from the multicodec table.
_PROTOCOLS: tuple[tuple[int, str, int], ...] = (
    (4, "ip4", 32),
    (6, "tcp", 16),
    (273, "udp", 16),
    (41, "ip6", 128),
    (53, "dns", -1),
    (54, "dns4", -1),
    (55, "dns6", -1),
    (56, "dnsaddr", -1),
    (421, "p2p", -1),
    (290, "p2p-circuit", 0),
    (460, "quic", 0),
    (461, "quic-v1", 0),
    (477, "ws", 0),
    (478, "wss", 0),
    (280, "webrtc-direct", 0),
    (281, "webrtc", 0),
)
_BY_NAME = {name: (code, size) for code, name, size in _PROTOCOLS}
_BY_CODE = {code: (name, size) for code, name, size in _PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]  # legacy alias still printed by older tools

# Addresses in identify messages are short; 1 KiB bounds one address and DNS names are at most 253 bytes.
MAX_MULTIADDR_BYTES = 1024
MAX_DNS_NAME_LENGTH = 253


@dataclass(frozen=True)
class Multiaddr:
    """An immutable multiaddr: a tuple of (protocol name, value) parts; value is "" for valueless parts."""

    parts: tuple[tuple[str, str], ...]

    # ------------------------------------------------------------------ parsing and printing

    @classmethod
    def parse(cls, text: str | Multiaddr) -> Multiaddr:
        if isinstance(text, Multiaddr):
            return text
        if not text.startswith("/") or len(text) > 4 * MAX_MULTIADDR_BYTES:
            raise MultiaddrError(f"{text[:80]!r} is not a multiaddr: it must start with '/'")
        tokens = text.strip("/").split("/")
        parts: list[tuple[str, str]] = []
        i = 0
        while i < len(tokens):
            name = tokens[i]
            if name not in _BY_NAME:
                raise MultiaddrError(f"unknown protocol {name!r} in multiaddr {text!r}")
            _, size = _BY_NAME[name]
            name = "p2p" if name == "ipfs" else name
            if size == 0:
                parts.append((name, ""))
                i += 1
                continue
            if i + 1 >= len(tokens):
                raise MultiaddrError(f"protocol {name!r} in multiaddr {text!r} lacks its value")
            value = tokens[i + 1]
            _encode_value(name, value)  # validates
            parts.append((name, _canonical_value(name, value)))
            i += 2
        return cls(tuple(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        if len(data) > MAX_MULTIADDR_BYTES:
            raise ProtocolError(f"binary multiaddr of {len(data)} bytes exceeds {MAX_MULTIADDR_BYTES}")
        parts: list[tuple[str, str]] = []
        pos = 0
        while pos < len(data):
            decoded = decode_uvarint(data, pos)
            if decoded is None:
                raise ProtocolError("truncated multiaddr protocol code")
            code, pos = decoded
            if code not in _BY_CODE:
                raise ProtocolError(f"unknown multiaddr protocol code {code}")
            name, size = _BY_CODE[code]
            if size > 0:
                length = size // 8
            elif size < 0:
                prefix = decode_uvarint(data, pos)
                if prefix is None:
                    raise ProtocolError("truncated multiaddr value length")
                length, pos = prefix
            else:
                parts.append((name, ""))
                continue
            if pos + length > len(data):
                raise ProtocolError(f"multiaddr {name} value runs past the end of the address")
            parts.append((name, _decode_value(name, bytes(data[pos : pos + length]))))
            pos += length
        return cls(tuple(parts))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.parts:
            code, size = _BY_NAME[name]
            out += encode_uvarint(code)
            if size == 0:
                continue
            raw = _encode_value(name, value)
            if size < 0:
                out += encode_uvarint(len(raw))
            out += raw
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{name}/{value}" if value else f"/{name}" for name, value in self.parts)

    def __repr__(self) -> str:
        return f"Multiaddr({self})"

    # ------------------------------------------------------------------ helpers

    def value_for(self, name: str) -> str | None:
        for part, value in self.parts:
            if part == name:
                return value
        return None

    @property
    def peer_id(self) -> PeerID | None:
        value = self.value_for("p2p")
        return PeerID.from_string(value) if value else None

    def without_peer_id(self) -> Multiaddr:
        return Multiaddr(tuple(p for p in self.parts if p[0] != "p2p"))

    def with_peer_id(self, peer_id: PeerID) -> Multiaddr:
        return Multiaddr((*self.without_peer_id().parts, ("p2p", str(peer_id))))

    def tcp_endpoint(self) -> tuple[str, int]:
        """(host, port) of a `/ip4|ip6|dns*/.../tcp/...` address, for the socket layer."""
        if len(self.parts) < 2 or self.parts[1][0] != "tcp":
            raise MultiaddrError(f"{self} is not a TCP address (want /ip4|ip6|dns/<host>/tcp/<port>)")
        kind, host = self.parts[0]
        if kind not in ("ip4", "ip6", "dns", "dns4", "dns6"):
            raise MultiaddrError(f"{self} starts with {kind}, not an IP address or DNS name")
        return host, int(self.parts[1][1])

    @classmethod
    def from_tcp(cls, host: str, port: int, peer_id: PeerID | None = None) -> Multiaddr:
        kind = "ip6" if ":" in host else "ip4"
        parts: list[tuple[str, str]] = [(kind, str(ipaddress.ip_address(host))), ("tcp", str(port))]
        if peer_id is not None:
            parts.append(("p2p", str(peer_id)))
        return cls(tuple(parts))


def _canonical_value(name: str, value: str) -> str:
    if name in ("ip4", "ip6"):
        return str(ipaddress.ip_address(value))
    if name in ("tcp", "udp"):
        return str(int(value))
    return value


def _encode_value(name: str, value: str) -> bytes:
    try:
        if name == "ip4":
            return ipaddress.IPv4Address(value).packed
        if name == "ip6":
            return ipaddress.IPv6Address(value).packed
        if name in ("tcp", "udp"):
            if not value.isdigit() or not 0 <= int(value) <= 0xFFFF:
                raise MultiaddrError(f"port {value!r} is not in 0..65535")
            return int(value).to_bytes(2, "big")
        if name == "p2p":
            return PeerID.from_string(value).multihash
        raw = value.encode("idna" if name != "dnsaddr" else "ascii")
        if not raw or len(raw) > MAX_DNS_NAME_LENGTH:
            raise MultiaddrError(f"DNS name {value!r} is empty or longer than {MAX_DNS_NAME_LENGTH}")
        return raw
    except (ValueError, UnicodeError) as exc:
        raise MultiaddrError(f"bad {name} value {value!r}: {exc}") from exc


def _decode_value(name: str, raw: bytes) -> str:
    try:
        if name == "ip4":
            return str(ipaddress.IPv4Address(raw))
        if name == "ip6":
            return str(ipaddress.IPv6Address(raw))
        if name in ("tcp", "udp"):
            return str(int.from_bytes(raw, "big"))
        if name == "p2p":
            return str(PeerID.from_bytes(raw))
        text = raw.decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise ProtocolError(f"bad binary {name} value in multiaddr: {exc}") from exc
    if not text or len(text) > MAX_DNS_NAME_LENGTH or "/" in text:
        raise ProtocolError(f"bad DNS name in binary multiaddr: {text[:40]!r}")
    return text
