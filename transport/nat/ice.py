"""ICE over UDP through aiortc: candidates from Shoal's own STUN responders (and TURN when configured),
one reliable data channel, and the Host's secure channel (Noise + yamux) on top of it.

This is the path for two peers that TCP cannot join (NATs that reset or block TCP punches, UDP-only
networks). aiortc's SCTP moves about 10 MB/s per core (docs/design.md, "Measured facts"), so it is a path
of last resort before the relay, never the bulk path when TCP works.

Traps handled here, each seen in measurements on this project's machines:
- aiortc falls back to Google's public STUN server when `iceServers` is empty: the configuration always
  names ours, and with none configured ICE is not attempted at all;
- aiortc uses one STUN and one TURN server, so the first of each is passed;
- aioice retries checks for tens of seconds: every attempt runs under ICE_DEADLINE_S;
- no trickle ICE: the offer is sent once gathering is done (a few ms against a nearby STUN server).

Signalling (offer and answer) travels over the relayed connection, on the hole-punch protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import TransportError
from .conduit import deliver

log = logging.getLogger(__name__)

# The whole ICE attempt: gathering, signalling, connectivity checks, DTLS, SCTP and the channel's open.
# In the lab it takes under a second (0.6 s measured, with one dropped first check); across the
# internet a few RTTs more. aioice alone would keep trying for about 40 s.
ICE_DEADLINE_S = 8.0
# Bytes per data-channel message: aiortc assumes a 64 KiB maximum for the remote; 16 KiB keeps each
# SCTP message to a few packets.
CHANNEL_CHUNK = 16 * 1024
# Bytes queued in the channel before the connection is asked to pause; resumed below a quarter of it.
# aiortc's receive window is a fixed 1 MiB, so queueing more only adds latency.
CHANNEL_HIGH = 1024 * 1024
CHANNEL_LABEL = "shoal"


class IceError(TransportError):
    """An ICE attempt failed (no candidate pair worked in time, or aiortc is missing)."""


@dataclass(frozen=True)
class IceServers:
    """STUN servers as (ip, port); TURN servers as (ip, port, user, password)."""

    stun: tuple[tuple[str, int], ...] = ()
    turn: tuple[tuple[str, int, str, str], ...] = ()

    def configuration(self) -> Any:
        try:
            from aiortc import RTCConfiguration, RTCIceServer
        except ImportError as exc:
            raise IceError("ICE needs aiortc: pip install aiortc") from exc
        if not self.stun and not self.turn:
            raise IceError("no STUN or TURN server configured: refusing aiortc's Google STUN default")
        servers = []
        if self.stun:
            ip, port = self.stun[0]
            servers.append(RTCIceServer(urls=f"stun:{ip}:{port}"))
        if self.turn:
            ip, port, user, password = self.turn[0]
            servers.append(RTCIceServer(urls=f"turn:{ip}:{port}", username=user, credential=password))
        return RTCConfiguration(iceServers=servers)


class DataChannelTransport(asyncio.Transport):
    """An `asyncio.Transport` over one aiortc data channel (ordered, reliable)."""

    def __init__(self, pc: Any, channel: Any) -> None:
        super().__init__()
        self._pc = pc
        self._channel = channel
        self._protocol: asyncio.BaseProtocol | None = None
        self._early: deque[bytes] = deque()
        self._paused = False
        self._closing = False
        self._lost = False
        self._shutdown: asyncio.Task[None] | None = None
        channel.bufferedAmountLowThreshold = CHANNEL_HIGH // 4
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._connection_lost(None))
        channel.on("bufferedamountlow", self._on_low)

    def start(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        while self._early:
            deliver(protocol, self._early.popleft())

    def _on_message(self, message: bytes | str) -> None:
        if not isinstance(message, bytes):
            log.info("ice: dropping a text message on the data channel")
            return
        if self._protocol is None:
            self._early.append(message)  # at most a handshake message or two before start()
        else:
            deliver(self._protocol, message)

    def _on_low(self) -> None:
        if self._paused and self._protocol is not None:
            self._paused = False
            self._protocol.resume_writing()

    def _connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._protocol is not None:
            self._protocol.connection_lost(error)
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._pc.close())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), CHANNEL_CHUNK):
            self._channel.send(bytes(view[offset : offset + CHANNEL_CHUNK]))
        if not self._paused and self._channel.bufferedAmount > CHANNEL_HIGH and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the channel's own buffered amount decides (CHANNEL_HIGH)

    def get_write_buffer_size(self) -> int:
        return int(self._channel.bufferedAmount)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._channel.close()

    def abort(self) -> None:
        self._closing = True
        self._channel.close()
        self._connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "shoal_path":
            return "ice"
        if name == "ice_pair":
            return selected_pair(self._pc)
        return default


def selected_pair(pc: Any) -> str | None:
    """The pair ICE nominated, as "local-type -> remote-type (remote address)", e.g. "host -> srflx
    (203.0.113.12:40000)"; a "relay" on either side means the path runs through TURN. Read from aioice's
    internals (aiortc does not expose it), so None when they change."""
    try:
        connection = pc.sctp.transport.transport._connection
        pair = connection._nominated.get(1)
        local, remote = pair.local_candidate, pair.remote_candidate
        return f"{local.type} -> {remote.type} ({remote.host}:{remote.port})"
    except (AttributeError, TypeError):
        return None


async def offer(servers: IceServers) -> tuple[Any, Any, str]:
    """Initiator: (peer connection, channel, offer SDP) with candidates gathered."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection(servers.configuration())
    channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, channel, pc.localDescription.sdp


async def finish_offer(pc: Any, channel: Any, answer_sdp: str) -> DataChannelTransport:
    """Initiator: apply the answer and wait for the channel to open."""
    from aiortc import RTCSessionDescription

    opened = asyncio.get_running_loop().create_future()
    transport = DataChannelTransport(pc, channel)

    def on_open() -> None:
        if not opened.done():
            opened.set_result(None)

    channel.on("open", on_open)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
    if channel.readyState != "open":
        await opened
    return transport


async def answer(
    servers: IceServers, offer_sdp: str
) -> tuple[Any, str, asyncio.Future[DataChannelTransport]]:
    """Responder: (peer connection, answer SDP, future of the transport once the channel arrives)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(servers.configuration())
    arrived: asyncio.Future[DataChannelTransport] = asyncio.get_running_loop().create_future()

    def on_channel(channel: Any) -> None:
        if not arrived.done() and channel.label == CHANNEL_LABEL:
            arrived.set_result(DataChannelTransport(pc, channel))  # handlers attached before any message

    pc.on("datachannel", on_channel)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc, pc.localDescription.sdp, arrived
