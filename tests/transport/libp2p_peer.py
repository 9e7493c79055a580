"""A py-libp2p 0.8.1 peer (trio, in its own process) for Shoal's interop tests and benchmark.

Usage, one JSON object per line on stdout:
    python libp2p_peer.py serve [KEYTYPE] -> {"addr": "/ip4/127.0.0.1/tcp/N/p2p/12D3..."}, serves until stdin
                                             closes; KEYTYPE is ed25519 (default) or secp256k1
    python libp2p_peer.py dial ADDR       -> {"peer": ..., "ping_ms": ..., "identify": {...}, "echo_ok": ...,
                                              "mismatch_refused": ...}
    python libp2p_peer.py bench ADDR MiB  -> {"connect_ms": [...], "rtt_us": [...], "throughput_mb_s": x}

It speaks only Noise and yamux (no plaintext fallback) with one connection per peer, as docs/design.md
recommends (`max_connections_per_peer=1` avoids a 250 ms happy-eyeballs wait on every dial).
"""

import json
import logging
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

ECHO = TProtocol("/echo/1.0.0")
SINK = TProtocol("/sink/1.0.0")
IDENTIFY = TProtocol("/ipfs/id/1.0.0")
MIB = 1 << 20


def make_host(key_type="ed25519"):
    if key_type == "secp256k1":
        from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair

        key_pair = create_secp256k1_key_pair()
    else:
        key_pair = create_new_key_pair()
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


async def read_some(stream, n):
    """py-libp2p raises StreamEOF at the end of a stream; return b"" like everyone else."""
    try:
        return await stream.read(n)
    except StreamEOF:
        return b""


def emit(obj):
    print(json.dumps(obj), flush=True)


async def echo_handler(stream):
    while True:
        data = await read_some(stream, 65536)
        if not data:
            break
        await stream.write(data)
    await stream.close_write()


async def sink_handler(stream):
    total = 0
    while True:
        data = await read_some(stream, 1 << 20)
        if not data:
            break
        total += len(data)
    await stream.write(str(total).encode())
    await stream.close_write()


async def read_all(stream, limit=64 * MIB):
    out = bytearray()
    while len(out) < limit:
        data = await read_some(stream, 65536)
        if not data:
            break
        out += data
    return bytes(out)


async def serve(key_type="ed25519"):
    host = make_host(key_type)
    host.set_stream_handler(ECHO, echo_handler)
    host.set_stream_handler(SINK, sink_handler)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = f"{host.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{host.get_id().pretty()}"
        emit({"addr": addr})
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin


async def dial(addr_text):
    host = make_host()
    result = {}
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr_text))
        with trio.fail_after(20):
            await host.connect(info)
        result["peer"] = info.peer_id.pretty()
        with trio.fail_after(20):
            result["ping_ms"] = (await PingService(host).ping(info.peer_id, 1))[0]
        with trio.fail_after(20):
            stream = await host.new_stream(info.peer_id, [IDENTIFY])
            ident = parse_identify_response(await read_all(stream))
            await stream.close()
        result["identify"] = {
            "protocols": list(ident.protocols),
            "listen_addrs": [str(multiaddr.Multiaddr(a)) for a in ident.listen_addrs],
            "observed_addr": str(multiaddr.Multiaddr(ident.observed_addr)),
            "agent_version": ident.agent_version,
            "key_matches": ID.from_pubkey(deserialize_public_key(ident.public_key)) == info.peer_id,
        }
        with trio.fail_after(30):
            stream = await host.new_stream(info.peer_id, [ECHO])
            payload = bytes(range(256)) * 4096  # 1 MiB
            echoed = bytearray()

            async def writer():
                for pos in range(0, len(payload), 65536):
                    await stream.write(payload[pos : pos + 65536])
                await stream.close_write()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                echoed = await read_all(stream)
            result["echo_ok"] = echoed == payload
        # A dial that names another peer id at the same address must be refused.
        wrong = create_new_key_pair()
        wrong_id = ID.from_pubkey(wrong.public_key)
        base = multiaddr.Multiaddr(addr_text).decapsulate(
            multiaddr.Multiaddr(f"/p2p/{info.peer_id.pretty()}")
        )
        try:
            with trio.fail_after(20):
                await host.connect(PeerInfo(wrong_id, [base]))
                result["mismatch_refused"] = False
        except Exception as exc:  # py-libp2p raises several types here; any failure is a refusal
            result["mismatch_refused"] = True
            result["mismatch_error"] = type(exc).__name__
    emit(result)


async def bench(addr_text, mib):
    host = make_host()
    result = {"connect_ms": [], "rtt_us": []}
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr_text))
        network = host.get_network()
        for _ in range(5):
            start = time.perf_counter()
            await host.connect(info)
            result["connect_ms"].append((time.perf_counter() - start) * 1e3)
            await network.close_peer(info.peer_id)
            await trio.sleep(0.05)
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [ECHO])
        for _ in range(200):
            start = time.perf_counter()
            await stream.write(b"x" * 64)
            got = b""
            while len(got) < 64:
                got += await read_some(stream, 64 - len(got))
            result["rtt_us"].append((time.perf_counter() - start) * 1e6)
        await stream.close()
        stream = await host.new_stream(info.peer_id, [SINK])
        block = b"\0" * (256 * 1024)
        cpu_start = time.process_time()
        start = time.perf_counter()
        for _ in range(mib * 4):
            await stream.write(block)
        await stream.close_write()
        reply = await read_all(stream)
        elapsed = time.perf_counter() - start
        result["transfer_cpu_s"] = time.process_time() - cpu_start
        assert int(reply) == mib * MIB, reply
        result["throughput_mb_s"] = mib * MIB / elapsed / 1e6
    emit(result)


def main():
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    mode = sys.argv[1]
    if mode == "serve":
        trio.run(serve, *sys.argv[2:3])
    elif mode == "dial":
        trio.run(dial, sys.argv[2])
    elif mode == "bench":
        trio.run(bench, sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
