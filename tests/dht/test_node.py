"""Real DHT nodes on loopback TCP: rendezvous, records, hostile bytes, persistence."""

import asyncio
import logging
import random
import struct
import time

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.errors import DHTError
from shoal.dht.keys import DHT_WORK_BITS
from shoal.dht.node import MAX_INBOUND_PER_PEER, DHTNode
from shoal.dht.protocol import PING, PROTOCOL_ID, STORE
from shoal.dht.records import Record
from shoal.dht.routing import RoutingTable
from shoal.transport.host import Host
from shoal.transport.identity import PeerID, b58encode
from shoal.transport.identity_work import meets, mine

pytestmark = pytest.mark.timeout(120)


async def swarm(n: int, secure: bool = True) -> list[DHTNode]:
    boot = await DHTNode.start(secure=secure)
    nodes = [boot]
    for _ in range(n - 1):
        nodes.append(await DHTNode.start(bootstrap=boot.addrs, secure=secure))
        await nodes[-1].joined()
    return nodes


async def close_all(nodes: list[DHTNode]) -> None:
    for n in nodes:
        await n.close()


def test_thirty_daemons_each_find_every_record_and_a_newcomer_finds_the_run() -> None:
    async def main() -> None:
        nodes = await swarm(30)
        try:
            for i, n in enumerate(nodes):
                assert await n.put(b"hello", b"from %d" % i) > 0
            misses = []
            for i, n in enumerate(nodes):
                for j, m in enumerate(nodes):
                    if i != j and await n.get(m.peer_id, b"hello") != b"from %d" % j:
                        misses.append((i, j))
            assert misses == []
            run = random.sample(nodes, 5)
            for p in run:
                await p.announce_run("run-x", p.addrs)
            # `peer join --run run-x --bootstrap ADDR`: a fresh node, one bootstrap address.
            newcomer = await DHTNode.start(bootstrap=nodes[-1].addrs)
            nodes.append(newcomer)
            found = dict(await newcomer.find_run_peers("run-x"))
            assert found == {p.peer_id: p.addrs for p in run}
            # A peer that leaves withdraws; the others still find the rest.
            run[0].withdraw_run("run-x")
            for _ in range(200):
                await asyncio.sleep(0.01)
                if run[0].peer_id not in dict(await nodes[7].find_run_peers("run-x")):
                    break
            left = dict(await nodes[7].find_run_peers("run-x"))
            assert set(left) == {p.peer_id for p in run[1:]} - {nodes[7].peer_id}
        finally:
            await close_all(nodes)

    asyncio.run(main())


def test_a_withdrawal_reaches_the_holders_of_the_announcement_even_after_the_network_changed() -> None:
    async def main() -> None:
        nodes = await swarm(4)
        try:
            leaver, watcher = nodes[1], nodes[3]
            await leaver.announce_run("run-y", leaver.addrs)
            assert leaver.peer_id in dict(await watcher.find_run_peers("run-y"))
            # Every contact the leaver had is gone from its table (they timed out, say): the lookup
            # for the key's closest nodes finds nobody, yet the holders still hear the withdrawal.
            leaver.core.table = RoutingTable(leaver.core.peer_id, leaver.core.k, leaver.core.work)
            leaver.withdraw_run("run-y")

            async def still_listed() -> list[bool]:
                others = (nodes[0], *nodes[2:])
                return [leaver.peer_id in dict(await n.find_run_peers("run-y")) for n in others]

            for _ in range(200):
                await asyncio.sleep(0.01)
                if not any(await still_listed()):
                    break
            assert await still_listed() == [False, False, False]
        finally:
            await close_all(nodes)

    asyncio.run(main())


def test_newer_value_replaces_older_over_plain_tcp_too() -> None:
    async def main() -> None:
        nodes = await swarm(6, secure=False)
        try:
            await nodes[1].put(b"k", b"one")
            await nodes[1].put(b"k", b"two")
            assert await nodes[4].get(nodes[1].peer_id, b"k") == b"two"
            assert await nodes[4].get(nodes[1].peer_id, b"nothing") is None
        finally:
            await close_all(nodes)

    asyncio.run(main())


def test_hostile_bytes_and_unsigned_records_are_refused_logged_and_never_stored(caplog) -> None:
    caplog.set_level(logging.INFO, logger="shoal.dht")

    async def main() -> None:
        nodes = await swarm(3)
        target = nodes[0]
        attacker_key = Ed25519PrivateKey.generate()
        attacker = await Host.create(attacker_key, ["/ip4/127.0.0.1/tcp/0"])

        async def raw_stream():
            return await attacker.new_stream(PeerID.from_bytes(target.peer_id), PROTOCOL_ID, target.addrs)

        async def exchange(body: bytes) -> dict | None:
            s = await raw_stream()
            await s.write(struct.pack(">I", len(body)) + body)
            try:
                (n,) = struct.unpack(">I", await s.readexactly(4))
                return msgpack.unpackb(await s.readexactly(n))
            except asyncio.IncompleteReadError:
                return None  # the node hung up on us
            finally:
                await s.close()

        try:
            # 1. A frame header announcing 1 GiB: refused before reading the body, stream closed.
            s = await raw_stream()
            await s.write(struct.pack(">I", 1 << 30))
            with pytest.raises(asyncio.IncompleteReadError):
                await s.readexactly(1)
            # 2. Garbage msgpack: the node hangs up.
            assert await exchange(b"\xc1\xc1\xc1") is None
            me = PeerID.from_public_key(attacker_key.public_key()).multihash
            work = mine(b58encode(me), DHT_WORK_BITS)
            # 3. A STORE whose record's signature is zeros: answered "not stored".
            good = Record.value_record(attacker_key, b"n", b"v", 1, time.time() + 600)
            forged = [*good.to_wire()[:8], bytes(64)]
            answer = await exchange(
                msgpack.packb(
                    {"v": 2, "t": STORE, "rid": 5, "from": [me, [], work], "rec": forged}, use_bin_type=True
                )
            )
            assert answer is not None and answer["rid"] == 5 and answer["ok"] is False
            # 4. A request that claims to come from another peer than the connection proved: hung up on.
            other = [nodes[1].peer_id, [], nodes[1].core.work]
            spoof = {"v": 2, "t": STORE, "rid": 6, "from": other, "rec": good.to_wire()}
            assert await exchange(msgpack.packb(spoof, use_bin_type=True)) is None
            # 5. A request from an identity that never proved the DHT's work: hung up on, nothing stored.
            lazy = next(n for n in range(1 << 20) if not meets(b58encode(me), n, DHT_WORK_BITS))
            unworked = {"v": 2, "t": STORE, "rid": 7, "from": [me, [], lazy], "rec": good.to_wire()}
            assert await exchange(msgpack.packb(unworked, use_bin_type=True)) is None
            assert len(target.core.store) == 0
            # The node still serves honest peers afterwards.
            await nodes[1].put(b"after", b"ok")
            assert await nodes[2].get(nodes[1].peer_id, b"after") == b"ok"
        finally:
            await attacker.close()
            await close_all(nodes)

    asyncio.run(main())
    text = caplog.text
    for what in ("exceeds", "not bounded msgpack", "not signed by its publisher", "the connection proved"):
        assert what in text


def test_routing_table_survives_a_restart(tmp_path) -> None:
    async def main() -> None:
        nodes = await swarm(8)
        key = Ed25519PrivateKey.generate()
        path = tmp_path / "table.json"
        try:
            me = await DHTNode.start(key, bootstrap=nodes[0].addrs, table_path=path)
            await me.joined()
            known = len(me.core.table)
            await me.close()
            assert path.exists() and known >= 5
            # Restart with no bootstrap address: the saved table is enough to rejoin.
            again = await DHTNode.start(key, table_path=path)
            nodes.append(again)
            assert len(again.core.table) >= known - 1
            await nodes[3].put(b"x", b"y")
            assert await again.get(nodes[3].peer_id, b"x") == b"y"
        finally:
            await close_all(nodes)

    asyncio.run(main())


def test_a_node_without_bootstrap_starts_a_network_of_its_own() -> None:
    async def main() -> None:
        first = await DHTNode.start()
        try:
            assert len(first.core.table) == 0
            assert await first.put(b"solo", b"v") >= 1
            assert await first.get(first.peer_id, b"solo") == b"v"
            second = await DHTNode.start(bootstrap=first.addrs)
            try:
                assert await second.get(first.peer_id, b"solo") == b"v"
            finally:
                await second.close()
        finally:
            await first.close()

    asyncio.run(main())


def test_on_host_refuses_a_key_that_is_not_the_hosts() -> None:
    async def main() -> None:
        host = await Host.create(Ed25519PrivateKey.generate(), ["/ip4/127.0.0.1/tcp/0"])
        try:
            with pytest.raises(DHTError, match="not the Host's identity"):
                await DHTNode.on_host(host, Ed25519PrivateKey.generate())
        finally:
            await host.close()

    asyncio.run(main())


def test_idle_streams_of_a_few_identities_never_keep_an_honest_ping_waiting() -> None:
    """Three identities park 600 inbound DHT streams (more than the node serves at once) and never send a
    request; each keeps at most its share, and an honest node's ping is answered at once."""

    async def main() -> None:
        target = await DHTNode.start()
        honest = await DHTNode.start()
        squatters = [await Host.create(Ed25519PrivateKey.generate()) for _ in range(3)]
        try:
            peer = PeerID.from_bytes(target.peer_id)
            parked = []
            for host in squatters:
                await host.connect(target.addrs[0])
                for _ in range(200):
                    parked.append(await host.new_stream(peer, PROTOCOL_ID))
            await asyncio.sleep(0.2)
            held = len(target._serving)
            assert held <= 3 * MAX_INBOUND_PER_PEER, f"{held} idle streams still served"
            answer = await asyncio.wait_for(honest.rpc(target.core.contact, honest.core.request(PING)), 5)
            assert answer.nodes and answer.nodes[0].id == target.core.contact.id
        finally:
            for host in squatters:
                await host.close()
            await close_all([honest, target])

    asyncio.run(main())
