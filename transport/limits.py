"""Limits and timeouts of a Host and its connections: every one of them bounds what a remote peer can cost."""

from __future__ import annotations

from dataclasses import dataclass

from . import yamux


@dataclass(frozen=True)
class HostLimits:
    """Limits and timeouts; defaults suit a daemon with a few dozen partners on the internet."""

    # Open connections (both directions). Shoal talks to one partner a round plus DHT neighbours.
    max_connections: int = 256
    # Inbound TCP connections still in their handshake: bounds the work an unauthenticated flood costs.
    # A full table never refuses a newcomer: the oldest pending handshake of the heaviest address goes.
    max_pending_handshakes: int = 64
    # Pending handshakes one address, and one /24 (IPv4) or /48 (IPv6), may hold; a new one from the same
    # place evicts its oldest. An honest handshake ends in milliseconds, so only idle sockets are evicted.
    max_pending_handshakes_per_ip: int = 8
    max_pending_handshakes_per_subnet: int = 16
    # Connections one identity may hold (a relayed, a punched and a simultaneous dial overlap); a further
    # one closes its least useful. Identities cost nothing, so the table also keeps room for newcomers:
    # when it is full, the heaviest address's least useful connection makes way (transport/admission.py).
    max_connections_per_peer: int = 4
    # Streams open at once on one connection (both directions); above it SYNs are answered with RST.
    max_streams_per_connection: int = yamux.DEFAULT_MAX_STREAMS
    # Largest per-stream receive window: the most a peer may send on one stream before our reader
    # consumes it. 16 MiB keeps a 1 Gbit/s x 100 ms path full. Windows start at 256 KiB and grow only
    # while the reader keeps up, so a connection whose handlers do not read holds 256 KiB per stream.
    stream_window: int = 16 * 1024 * 1024
    # Unread bytes held in all streams of the host together (what peers sent before our handlers read
    # it). Above it, streams are reset, the one read least recently first, until a quarter is free: parked
    # streams go, streams being read stay. Four full 16 MiB windows of honest transfers being read fit
    # below it with room; an attacker who parks streams on many connections costs at most this much.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # TCP connect plus Noise plus muxer negotiation; a peer slower than this is unusable for training.
    handshake_timeout_s: float = 10.0
    # multistream-select on a new stream.
    negotiate_timeout_s: float = 10.0
    # A ping stream whose next ping does not come within this long is closed.
    ping_idle_timeout_s: float = 30.0
    # A connection with no open stream for this long is closed (the DHT redials cheaply).
    idle_timeout_s: float = 300.0
    # Bytes one socket may queue in user space before writers wait (on top of the kernel's unsent bytes,
    # capped by connection.UNSENT_LOWAT). Small on purpose: a window update, a protocol answer or a small
    # message waits behind everything queued before it, so a deep queue of one direction's bulk data
    # stalls the other direction's flow control (a full-duplex swap then runs at 0.6 of the link, not 0.9).
    write_buffer_high: int = 64 * 1024

    def __post_init__(self) -> None:
        if not yamux.INITIAL_WINDOW <= self.stream_window <= yamux.MAX_WINDOW:
            raise ValueError(
                f"stream_window must be in {yamux.INITIAL_WINDOW}..{yamux.MAX_WINDOW} bytes, "
                f"got {self.stream_window}"
            )
        for name in (
            "max_connections",
            "max_pending_handshakes",
            "max_pending_handshakes_per_ip",
            "max_pending_handshakes_per_subnet",
            "max_connections_per_peer",
            "max_streams_per_connection",
            "max_buffered_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("handshake_timeout_s", "negotiate_timeout_s", "idle_timeout_s", "ping_idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
