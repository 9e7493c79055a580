"""A one-way delay line for the NAT lab, since this kernel has no netem.

    python natlab/delay.py IFACE_A IFACE_B DELAY_MS

Run inside a lab namespace: copies every Ethernet frame arriving on one interface out of the other after
DELAY_MS (both directions), like a wire that is long. The interfaces carry no addresses and are put in
promiscuous mode by the lab, so the pair behaves as a transparent link between a router and the bridge.
Frames queued beyond MAX_QUEUED are dropped (a full router queue), with one log line per second at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
# Largest frame on a veth with the default 1500 MTU, plus headroom (GSO is off on these links).
MAX_FRAME = 65536
# Frames held in flight per direction: 20 Mbit/s x 200 ms is about 350 full frames; 4096 leaves room
# for unshaped links without letting memory grow without bound.
MAX_QUEUED = 4096


def _open(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.setblocking(False)
    return sock


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit("usage: python natlab/delay.py IFACE_A IFACE_B DELAY_MS")
    a, b, delay_ms = argv[0], argv[1], float(argv[2])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s labdelay %(message)s")
    asyncio.run(_run(a, b, delay_ms / 1000.0))


async def _run(a: str, b: str, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    socks = {a: _open(a), b: _open(b)}
    queued = {a: 0, b: 0}
    last_drop = [0.0]

    def forward(src: str, dst: str) -> None:
        sock = socks[src]
        while True:
            try:
                frame, meta = sock.recvfrom(MAX_FRAME)
            except BlockingIOError:
                return
            if meta[2] == PACKET_OUTGOING:  # our own copy of a frame we sent out of this interface
                continue
            if queued[dst] >= MAX_QUEUED:
                now = time.monotonic()
                if now - last_drop[0] > 1.0:
                    log.warning("dropping frames toward %s: %d queued", dst, queued[dst])
                    last_drop[0] = now
                continue
            queued[dst] += 1
            loop.call_later(delay_s, send, dst, frame)

    def send(dst: str, frame: bytes) -> None:
        queued[dst] -= 1
        try:
            socks[dst].send(frame)
        except OSError as exc:  # a full device queue: the frame is lost, as on a real link
            log.debug("send on %s failed: %s", dst, exc)

    loop.add_reader(socks[a].fileno(), forward, a, b)
    loop.add_reader(socks[b].fileno(), forward, b, a)
    print("ready", flush=True)  # the lab waits for this before it uses the link
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
