"""Interop with py-libp2p 0.8.1 (the reference peer), both directions, over real loopback sockets.

py-libp2p runs on trio, so its side runs in a subprocess (`libp2p_peer.py`). Skipped, with the reason,
when the `libp2p` package is not installed (it is a test-only dependency: `pip install libp2p==0.8.1`,
which builds fastecdsa against libgmp-dev).
"""

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from shoal.transport.errors import PeerIDMismatchError
from shoal.transport.host import Host
from shoal.transport.identity import PeerID, generate_key, peer_id_from_key
from shoal.transport.multiaddr import Multiaddr

pytestmark = [
    pytest.mark.slow,  # a py-libp2p peer process
    pytest.mark.skipif(
        importlib.util.find_spec("libp2p") is None,
        reason="py-libp2p is not installed (a test-only dependency: "
        "apt-get install libgmp-dev && pip install libp2p==0.8.1)",
    ),
]

PEER_SCRIPT = Path(__file__).with_name("libp2p_peer.py")
# py-libp2p imports in 1-2 s and is slow on a loaded 2-core machine; generous, it only bounds a hang.
PEER_DEADLINE_S = 50


@contextlib.asynccontextmanager
async def libp2p_server(key_type="ed25519"):
    """A py-libp2p peer serving /echo/1.0.0 in a subprocess; yields its full multiaddr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PEER_SCRIPT),
        "serve",
        key_type,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), PEER_DEADLINE_S)
        yield Multiaddr.parse(json.loads(line)["addr"])
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def echo(stream):
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


async def test_shoal_dials_py_libp2p():
    async with (
        libp2p_server() as addr,
        await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as host,
    ):
        # A dial naming another peer id at that address is refused by the Noise handshake.
        impostor = peer_id_from_key(generate_key())
        with pytest.raises(PeerIDMismatchError):
            await host.connect(addr.with_peer_id(impostor))

        peer = await host.connect(addr)
        assert peer == addr.peer_id
        assert await host.ping(peer) > 0

        info = await host.identify(peer)
        assert info.public_key is not None and info.public_key.peer_id() == peer
        assert info.agent_version.startswith("py-libp2p")
        assert "/echo/1.0.0" in info.protocols and "/ipfs/ping/1.0.0" in info.protocols
        assert addr.without_peer_id() in info.listen_addrs
        assert info.observed_addr is not None and info.observed_addr.tcp_endpoint()[0] == "127.0.0.1"

        stream = await host.new_stream(peer, "/echo/1.0.0")
        payload = os.urandom(1 << 20)
        writer = asyncio.create_task(stream.write(payload))
        assert await stream.readexactly(len(payload)) == payload
        await writer
        await stream.close()
        assert await stream.read() == b""


async def test_shoal_verifies_a_secp256k1_identity():
    # libp2p peers may use secp256k1 keys: the Noise payload's signature is ECDSA over SHA-256.
    async with libp2p_server("secp256k1") as addr:
        assert not str(addr.peer_id).startswith("12D3KooW")  # not an Ed25519 id
        async with await Host.create(generate_key()) as host:
            assert await host.connect(addr) == addr.peer_id
            assert await host.ping(addr.peer_id) > 0


async def test_py_libp2p_dials_shoal():
    async with await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler("/echo/1.0.0", echo)
        addr = host.listen_addrs[0].with_peer_id(host.peer_id)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            "dial",
            str(addr),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PEER_DEADLINE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode()[-2000:]
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert PeerID.from_string(result["peer"]) == host.peer_id
        assert result["ping_ms"] >= 0
        ident = result["identify"]
        assert ident["key_matches"] and ident["agent_version"].startswith("shoal/")
        assert "/echo/1.0.0" in ident["protocols"] and "/ipfs/ping/1.0.0" in ident["protocols"]
        assert str(host.listen_addrs[0]) in ident["listen_addrs"]
        assert ident["observed_addr"].startswith("/ip4/127.0.0.1/tcp/")
        assert result["echo_ok"], "1 MiB echoed through Shoal came back different"
        assert result["mismatch_refused"], "py-libp2p connected to Shoal under a peer id Shoal does not hold"
