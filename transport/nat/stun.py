"""STUN Binding (RFC 8489): the codec, a responder public peers serve themselves, and a client.

Only what address discovery needs: Binding requests and success responses with XOR-MAPPED-ADDRESS
(RFC 8489 section 14.2), over UDP and TCP (section 6.2.2: over TCP the same messages are sent back to
back, each self-delimiting by its length field). A responder answers any well-formed Binding request and
ignores everything else, so aioice/aiortc and coturn-style clients use Shoal peers as STUN servers.

Everything that arrives is hostile: a message is checked (size, type, magic cookie, length) before it is
parsed, and one response is sent per request, never larger than the request allows to amplify.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass

from ..errors import ProtocolError

log = logging.getLogger(__name__)

MAGIC_COOKIE = 0x2112A442
HEADER = struct.Struct(">HHI12s")
HEADER_SIZE = HEADER.size
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
SOFTWARE = b"shoal"
# A Binding request needs no attributes; 548 bytes is the smallest size every IPv4 path carries (RFC 8489
# section 7.1) and far more than any client sends. Bigger messages are dropped unparsed.
MAX_MESSAGE_SIZE = 548
# A TCP client waiting longer than this for its answer has lost the server; also bounds an idle TCP
# connection on the responder, so idle sockets cannot pile up.
STUN_TIMEOUT_S = 3.0
# UDP is lossy: the client resends its request this often before giving up (RFC 8489 uses 500 ms RTO).
UDP_RETRANSMIT_S = 0.25
# Requests answered on one TCP connection before the responder closes it: a client needs one.
MAX_REQUESTS_PER_TCP_CONNECTION = 16
# Open TCP connections the responder holds at once; beyond it new ones are closed immediately.
MAX_TCP_CONNECTIONS = 256


class StunError(ProtocolError):
    """A STUN message was malformed, or no usable answer came back."""


@dataclass(frozen=True)
class Message:
    kind: int
    transaction_id: bytes
    mapped: tuple[str, int] | None = None


def parse(data: bytes) -> Message:
    """One STUN message; StunError if it is not a well-formed Binding request or success response."""
    if len(data) < HEADER_SIZE or len(data) > MAX_MESSAGE_SIZE:
        raise StunError(f"STUN message of {len(data)} bytes is outside {HEADER_SIZE}..{MAX_MESSAGE_SIZE}")
    kind, length, cookie, txid = HEADER.unpack_from(data)
    if kind & 0xC000 or cookie != MAGIC_COOKIE:
        raise StunError("not a STUN message (bad type bits or magic cookie)")
    if length % 4 or HEADER_SIZE + length != len(data):
        raise StunError(f"STUN length field {length} does not match the {len(data)} bytes received")
    mapped = None
    offset = HEADER_SIZE
    while offset + 4 <= len(data):
        attr, size = struct.unpack_from(">HH", data, offset)
        value = data[offset + 4 : offset + 4 + size]
        if len(value) != size:
            raise StunError("STUN attribute runs past the end of the message")
        if attr in (ATTR_XOR_MAPPED_ADDRESS, ATTR_MAPPED_ADDRESS) and (mapped is None or attr == 0x0020):
            mapped = _decode_address(value, txid, xor=attr == ATTR_XOR_MAPPED_ADDRESS)
        offset += 4 + size + (-size % 4)
    if kind not in (BINDING_REQUEST, BINDING_SUCCESS):
        raise StunError(f"STUN message type {kind:#06x} is not a Binding request or success")
    return Message(kind, txid, mapped)


def binding_request(transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """(message, transaction id) of a Binding request without attributes."""
    txid = transaction_id or os.urandom(12)
    return HEADER.pack(BINDING_REQUEST, 0, MAGIC_COOKIE, txid), txid


def binding_success(transaction_id: bytes, host: str, port: int) -> bytes:
    address = _encode_xor_address(host, port, transaction_id)
    attrs = struct.pack(">HH", ATTR_XOR_MAPPED_ADDRESS, len(address)) + address
    software = SOFTWARE + b"\0" * (-len(SOFTWARE) % 4)
    attrs += struct.pack(">HH", ATTR_SOFTWARE, len(SOFTWARE)) + software
    return HEADER.pack(BINDING_SUCCESS, len(attrs), MAGIC_COOKIE, transaction_id) + attrs


def answer(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The responder's core: the reply to `data` from `source`, or None (logged) when it is no request."""
    try:
        message = parse(data)
    except StunError as exc:
        log.debug("dropping %d bytes from %s:%d: %s", len(data), source[0], source[1], exc)
        return None
    if message.kind != BINDING_REQUEST:
        return None
    return binding_success(message.transaction_id, source[0], source[1])


def _encode_xor_address(host: str, port: int, txid: bytes) -> bytes:
    ip = ipaddress.ip_address(host)
    family = 1 if ip.version == 4 else 2
    mask = struct.pack(">I", MAGIC_COOKIE) + (txid if ip.version == 6 else b"")
    packed = bytes(a ^ b for a, b in zip(ip.packed, mask, strict=True))
    return struct.pack(">BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + packed


def _decode_address(value: bytes, txid: bytes, *, xor: bool) -> tuple[str, int]:
    if len(value) not in (8, 20):
        raise StunError(f"STUN address attribute of {len(value)} bytes")
    _, family, port = struct.unpack_from(">BBH", value)
    raw = value[4:]
    if (family, len(raw)) not in ((1, 4), (2, 16)):
        raise StunError(f"STUN address family {family} does not match its {len(raw)} bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = struct.pack(">I", MAGIC_COOKIE) + txid
        raw = bytes(a ^ b for a, b in zip(raw, mask[: len(raw)], strict=True))
    return str(ipaddress.ip_address(raw)), port


# ---------------------------------------------------------------------- responder (asyncio shell)


class _UdpResponder(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data, addr[:2])
        if reply is not None:
            self.transport.sendto(reply, addr)


class StunResponder:
    """Answers Binding requests on one UDP and one TCP port (same number) until `close()`."""

    def __init__(self) -> None:
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_open = 0
        self.port = 0

    @classmethod
    async def start(cls, host: str = "0.0.0.0", port: int = 3478) -> StunResponder:
        loop = asyncio.get_running_loop()
        responder = cls()
        try:
            responder._tcp = await asyncio.start_server(responder._serve_tcp, host, port)
            responder.port = responder._tcp.sockets[0].getsockname()[1]
            responder._udp, _ = await loop.create_datagram_endpoint(
                _UdpResponder, local_addr=(host, responder.port)
            )
        except BaseException:
            responder.close()
            raise
        log.info("STUN responder on %s:%d (udp, tcp)", host, responder.port)
        return responder

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[:2]
        if self._tcp_open >= MAX_TCP_CONNECTIONS:
            log.warning("STUN: refusing TCP client %s: %d connections open", source, self._tcp_open)
            writer.close()
            return
        self._tcp_open += 1
        try:
            for _ in range(MAX_REQUESTS_PER_TCP_CONNECTION):
                async with asyncio.timeout(STUN_TIMEOUT_S):
                    header = await reader.readexactly(HEADER_SIZE)
                    length = struct.unpack_from(">H", header, 2)[0]
                    if HEADER_SIZE + length > MAX_MESSAGE_SIZE:
                        log.info("STUN: closing TCP client %s: message of %d bytes", source, length)
                        return
                    body = await reader.readexactly(length)
                reply = answer(header + body, source)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_open -= 1
            writer.close()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


# ---------------------------------------------------------------------- clients


def reusable_tcp_socket(local_port: int, host: str = "0.0.0.0") -> socket.socket:
    """A non-blocking TCP socket bound to `local_port` that other sockets may share (hole punching)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, local_port))
    except BaseException:
        sock.close()
        raise
    return sock


async def query_tcp(server: tuple[str, int], local_port: int = 0) -> tuple[tuple[str, int], int]:
    """Our address as `server` sees a TCP connection from `local_port`: ((ip, port), local port used)."""
    loop = asyncio.get_running_loop()
    sock = reusable_tcp_socket(local_port)
    try:
        async with asyncio.timeout(STUN_TIMEOUT_S):
            await loop.sock_connect(sock, server)
            request, txid = binding_request()
            await loop.sock_sendall(sock, request)
            data = b""
            while len(data) < HEADER_SIZE or len(data) < HEADER_SIZE + struct.unpack_from(">H", data, 2)[0]:
                chunk = await loop.sock_recv(sock, MAX_MESSAGE_SIZE)
                if not chunk:
                    raise StunError(f"STUN server {server[0]}:{server[1]} closed without answering")
                data += chunk
                if len(data) > MAX_MESSAGE_SIZE:
                    raise StunError(f"STUN server {server[0]}:{server[1]} sent an oversized answer")
        used = sock.getsockname()[1]
    except (TimeoutError, OSError) as exc:
        raise StunError(f"STUN over TCP to {server[0]}:{server[1]} failed: {exc or 'timed out'}") from exc
    finally:
        sock.close()
    return _mapped_from(parse(data), txid, server), used


async def query_udp(server: tuple[str, int], local_port: int = 0) -> tuple[str, int]:
    """Our address as `server` sees UDP datagrams from `local_port`, resending until STUN_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not replies.full():
                replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(_Client, local_addr=("0.0.0.0", local_port))
    request, txid = binding_request()
    try:
        async with asyncio.timeout(STUN_TIMEOUT_S):
            while True:
                transport.sendto(request, server)
                try:
                    async with asyncio.timeout(UDP_RETRANSMIT_S):
                        data = await replies.get()
                except TimeoutError:
                    continue
                try:
                    return _mapped_from(parse(data), txid, server)
                except StunError as exc:
                    log.debug("ignoring STUN answer: %s", exc)
    except TimeoutError as exc:
        where = f"{server[0]}:{server[1]}"
        raise StunError(f"no STUN answer from {where} over UDP in {STUN_TIMEOUT_S} s") from exc
    finally:
        transport.close()


def _mapped_from(message: Message, txid: bytes, server: tuple[str, int]) -> tuple[str, int]:
    if message.kind != BINDING_SUCCESS or message.transaction_id != txid or message.mapped is None:
        raise StunError(f"STUN server {server[0]}:{server[1]} gave no mapped address for our request")
    return message.mapped
