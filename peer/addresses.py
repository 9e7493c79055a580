"""Peer addresses as users write them (`HOST:PORT` or a multiaddr) and the one a listening peer publishes."""

from __future__ import annotations

import contextlib
import re
import socket

from shoal.errors import ShoalError
from shoal.transport.multiaddr import Multiaddr


class AddressError(ShoalError):
    """An address that cannot be read."""


def listen_multiaddr(text: str) -> str:
    """`HOST:PORT` or a multiaddr -> the multiaddr to listen on."""
    host, port = parse_address(text)
    return str(Multiaddr.from_tcp(host, port)) if not text.startswith("/") else text


def parse_address(text: str) -> tuple[str, int]:
    """`/ip4/HOST/tcp/PORT[/p2p/ID]`, `/dns4/NAME/tcp/PORT[...]` or `HOST:PORT` -> (host, port)."""
    match = re.fullmatch(r"/(?:ip4|ip6|dns4|dns6|dns)/([^/]+)/tcp/(\d+)(?:/p2p/[^/]+)?/?", text.strip())
    if match is None:
        match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", text.strip())
    if match is None or not 0 <= int(match[2]) < 65536:
        raise AddressError(f"cannot read address {text!r}; expected /ip4/HOST/tcp/PORT/p2p/ID or HOST:PORT")
    return match[1], int(match[2])


def advertised_host(bound_host: str) -> str:
    """The address others should dial when we listen on all interfaces: the one our default route leaves
    from (a connected UDP socket tells, sending nothing), else what the host name resolves to."""
    if bound_host not in ("0.0.0.0", "::", ""):
        return bound_host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("1.1.1.1", 9))  # any address the default route covers; UDP connect() sends nothing
        outward = probe.getsockname()[0]
        if not outward.startswith("127.") and outward != "0.0.0.0":
            return outward
    try:
        candidates = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        candidates = []
    routable = [a for a in candidates if not a.startswith("127.")]
    return routable[0] if routable else "127.0.0.1"
