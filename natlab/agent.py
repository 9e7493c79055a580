"""A Shoal peer for the NAT lab: one Host with the NAT layer, driven by JSON lines on stdin/stdout.

Run inside a lab namespace (`NatLab.spawn_python(ns, [natlab/agent.py, ...])`). It prints
`{"event": "ready", ...}` once started, then answers one line per command:

    {"cmd": "connect", "peer": ID, "addrs": [...]}   -> {"event": "connected", "path", "connect_s", ...}
    {"cmd": "upgrade", "peer": ID}                   -> the same, after one more punch if still relayed
    {"cmd": "send", "peer": ID, "bytes": N}          -> {"event": "sent", "mb_s", "path"}
    {"cmd": "report"}                                -> {"event": "report", "paths": [...]}
    {"cmd": "quit"}

Errors come back as {"event": "error", "error": "..."}; the agent keeps running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import sys
import time
from typing import Any

from shoal.transport.host import Host, Stream
from shoal.transport.identity import PeerID, generate_key
from shoal.transport.multiaddr import Multiaddr
from shoal.transport.nat.conduit import connection_to, path_of
from shoal.transport.nat.paths import NatConfig, NatService
from shoal.transport.nat.reachability import PUBLIC

SINK_PROTOCOL = "/shoal/natlab/sink/1.0.0"
# Largest transfer a command may ask for: the bench sends 16 MiB.
MAX_SEND_BYTES = 1 << 30
SEND_CHUNK = 1 << 20
# A command line longer than this is refused unread (addresses of a few peers fit easily).
MAX_COMMAND_LINE = 64 * 1024
READY_RESERVATION_TRIES = 3  # more tries at a relay slot before reporting ready without one


async def _sink(stream: Stream) -> None:
    """Count bytes until EOF, then answer with the count (the sender times the whole exchange)."""
    total = 0
    while data := await stream.read():
        total += len(data)
    await stream.write(struct.pack(">Q", total))
    await stream.close()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _send(nat: NatService, peer: PeerID, nbytes: int) -> dict[str, Any]:
    if not 0 < nbytes <= MAX_SEND_BYTES:
        raise ValueError(f"send size {nbytes} outside 1..{MAX_SEND_BYTES}")
    stream = await nat.host.new_stream(peer, SINK_PROTOCOL)
    path = path_of(connection_to(nat.host, peer))  # the connection new streams to `peer` use
    chunk = bytes(SEND_CHUNK)
    started = time.perf_counter()
    left = nbytes
    while left > 0:
        piece = chunk[: min(left, SEND_CHUNK)]
        await stream.write(piece)
        left -= len(piece)
    await stream.close()
    (got,) = struct.unpack(">Q", await stream.readexactly(8))
    seconds = time.perf_counter() - started
    if got != nbytes:
        raise RuntimeError(f"the sink counted {got} of {nbytes} bytes")
    nat.record_transfer(peer, nbytes, seconds)
    mb_s = nbytes / seconds / 1e6
    return {"event": "sent", "bytes": nbytes, "seconds": seconds, "mb_s": mb_s, "path": path}


async def _command(nat: NatService, line: str) -> bool:
    try:
        command = json.loads(line)
        kind = command.get("cmd")
        if kind == "quit":
            return False
        if kind == "connect":
            peer = PeerID.from_string(command["peer"])
            info = await nat.connect(peer, command["addrs"])
            rtt = await nat.measure_rtt(peer)
            _emit(
                {"event": "connected", **nat.paths[peer].as_dict(), "rtt_s": rtt, "connect_s": info.connect_s}
            )
        elif kind == "upgrade":  # what the daemon's maintenance does for a partner still relayed
            peer = PeerID.from_string(command["peer"])
            info = await nat.upgrade(peer)
            _emit({"event": "connected", **(info.as_dict() if info else {"path": None})})
        elif kind == "send":
            _emit(await _send(nat, PeerID.from_string(command["peer"]), int(command["bytes"])))
        elif kind == "report":
            _emit({"event": "report", "paths": nat.report()})
        else:
            _emit({"event": "error", "error": f"unknown command {kind!r}"})
    except Exception as exc:  # one bad command must not end the agent: report it and go on
        _emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
    return True


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="natlab/agent.py")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--relay", action="append", default=[], help="relay multiaddr with /p2p/ id")
    parser.add_argument("--stun", action="append", default=[], help="STUN server ip:port")
    parser.add_argument("--serve-stun", type=int, default=None, help="serve STUN on this port")
    parser.add_argument("--serve-relay", action="store_true")
    parser.add_argument("--no-punch", action="store_true")
    parser.add_argument("--punch-methods", default="tcp,ice", help="comma-separated, tried in order")
    parser.add_argument("--turn", action="append", default=[], help="TURN server ip:port:user:password")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    stun_servers = tuple((s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in args.stun)
    config = NatConfig(
        relays=tuple(Multiaddr.parse(r) for r in args.relay),
        stun_servers=stun_servers,
        serve_stun_port=args.serve_stun,
        serve_relay=args.serve_relay,
        punch=not args.no_punch,
        punch_methods=tuple(m for m in args.punch_methods.split(",") if m),
        turn_servers=tuple(
            (ip, int(port), user, password)
            for ip, port, user, password in (t.split(":", 3) for t in args.turn)
        ),
    )
    async with await Host.create(generate_key(), [args.listen]) as host:
        host.set_stream_handler(SINK_PROTOCOL, _sink)
        nat = NatService(host, config)
        try:
            await nat.start()
            # On a loaded machine a first reservation can time out; the daemon's maintenance would retry
            # within a minute, the lab needs the relayed address before it reports ready.
            for _ in range(READY_RESERVATION_TRIES):
                if nat.reachability.status == PUBLIC or not config.relays or nat.reservations:
                    break
                await asyncio.sleep(1.0)
                await nat.maintain_once()
            _emit(
                {
                    "event": "ready",
                    "peer": str(host.peer_id),
                    "addrs": [str(a) for a in nat.addrs()],
                    "reachability": nat.reachability.status,
                    "observed": str(nat.reachability.observed) if nat.reachability.observed else None,
                }
            )
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=MAX_COMMAND_LINE)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                if not await _command(nat, line.decode()):
                    break
        finally:
            await nat.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except KeyboardInterrupt:
        pass
