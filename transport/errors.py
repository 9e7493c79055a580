"""Errors of the transport layer, all rooted in `shoal.errors.ShoalError`.

A peer's misbehaviour raises `ProtocolError` (or a subclass) inside a sans-I/O core; the asyncio host
turns it into a closed connection and one log line, never into a crash of the daemon.
"""

from shoal.errors import ShoalError


class TransportError(ShoalError):
    """Something went wrong while talking to a peer."""


class ProtocolError(TransportError):
    """The remote side broke the wire protocol (malformed frame, limit exceeded, bad state)."""


class NegotiationError(ProtocolError):
    """multistream-select found no protocol both sides speak, or the exchange was malformed."""


class HandshakeError(ProtocolError):
    """The Noise handshake failed: bad message, bad signature, or decryption failure."""


class DecryptError(ProtocolError):
    """A Noise transport frame failed authentication: the bytes were altered on the way."""


class PeerIDMismatchError(HandshakeError):
    """The peer proved an identity other than the one we dialed."""


class DuplicateIdentityError(TransportError):
    """Another live daemon uses our own identity key."""


class KeyFileError(TransportError):
    """A key file is missing, malformed, or readable by others."""


class MultiaddrError(TransportError):
    """A multiaddr string or byte form could not be parsed."""


class StreamResetError(TransportError):
    """The stream was reset (by the peer, by us, or because its connection closed)."""


class StreamClosedError(TransportError):
    """Writing to a stream whose sending half we already closed."""


class ConnectionClosedError(TransportError):
    """The connection to the peer is closed."""


class LimitError(TransportError):
    """A configured limit (connections, streams, sizes) refused the request."""
