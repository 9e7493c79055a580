"""The NAT layer end to end on 127.0.0.1: reachability verdicts, relay fallback, punch and reversal.

Peers without a listener are what a NAT makes of a peer: nobody can dial them. On loopback a TCP
simultaneous open works like through two port-preserving NATs, so the whole punch protocol runs here
without root; `test_lab.py` repeats it through real NAT routers.
"""

import asyncio
import contextlib
import dataclasses
import os

import pytest

from shoal.transport.host import Host
from shoal.transport.identity import generate_key
from shoal.transport.nat import reachability
from shoal.transport.nat.conduit import connection_to, path_of
from shoal.transport.nat.paths import DIRECT, RELAY, TCP_PUNCH, NatConfig, NatService

pytestmark = pytest.mark.slow  # network namespaces

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def echo(stream):
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


@contextlib.asynccontextmanager
async def nat_peers(*, a_listens=False, punch=True):
    async with (
        await Host.create(generate_key(), [LOOPBACK]) as relay_host,
        await Host.create(generate_key(), [LOOPBACK] if a_listens else []) as a,
        await Host.create(generate_key(), []) as b,
    ):
        serving = NatConfig(serve_relay=True, serve_stun_port=0, serve_stun_host="127.0.0.1")
        relay = NatService(relay_host, serving)
        await relay.start()
        relay_addr = relay_host.listen_addrs[0].with_peer_id(relay_host.peer_id)
        # ICE stays off on loopback: its host candidates would be this machine's own interfaces.
        config = NatConfig(
            relays=(relay_addr,),
            stun_servers=(("127.0.0.1", relay.stun_port),),
            punch=punch,
            punch_methods=("tcp",),
        )
        nat_a, nat_b = NatService(a, config), NatService(b, config)
        await asyncio.gather(nat_a.start(), nat_b.start())
        b.set_stream_handler("/echo/1", echo)
        try:
            yield nat_a, nat_b
        finally:
            for service in (nat_a, nat_b, relay):
                await service.close()


async def echo_through(host, peer, size=1 << 20):
    stream = await host.new_stream(peer, "/echo/1")
    payload = os.urandom(size)
    writer = asyncio.create_task(stream.write(payload))
    got = await stream.readexactly(size)
    await writer
    await stream.close()
    return got == payload


async def test_peers_without_listeners_are_firewalled_and_publish_relayed_addresses():
    async with nat_peers() as (nat_a, nat_b):
        for nat in (nat_a, nat_b):
            assert nat.reachability.status == reachability.FIREWALLED
            assert nat.reservations and all("p2p-circuit" in str(a) for a in nat.addrs())


async def test_a_listening_peer_is_confirmed_public_and_publishes_no_relay():
    async with nat_peers(a_listens=True) as (nat_a, _):
        assert nat_a.reachability.status == reachability.PUBLIC
        assert nat_a.reachability.public_addrs == [nat_a.host.listen_addrs[0]]
        assert not nat_a.reservations


async def test_relayed_peers_punch_a_direct_tcp_path_and_drop_the_relay():
    async with nat_peers() as (nat_a, nat_b):
        b_id = nat_b.host.peer_id
        info = await nat_a.connect(b_id, nat_b.addrs())
        assert info.path == TCP_PUNCH, info.reason
        conn = connection_to(nat_a.host, b_id)
        assert path_of(conn) == TCP_PUNCH
        assert await echo_through(nat_a.host, b_id)
        assert nat_b.paths[nat_a.host.peer_id].path == TCP_PUNCH  # the other side knows it too
        # The relayed connection is closed once the punched one carries the traffic.
        for _ in range(300):
            relayed = [c for c in nat_a.host._all_conns if path_of(c) == RELAY]
            if not relayed:
                break
            await asyncio.sleep(0.01)
        assert not relayed


async def test_a_public_initiator_is_dialed_back_directly_by_a_relayed_peer():
    async with nat_peers(a_listens=True) as (nat_a, nat_b):
        info = await nat_a.connect(nat_b.host.peer_id, nat_b.addrs())
        assert info.path == DIRECT and "reversal" in info.reason
        assert await echo_through(nat_a.host, nat_b.host.peer_id)


async def test_without_punching_the_relay_carries_data_and_reports_rtt_and_throughput():
    async with nat_peers(punch=False) as (nat_a, nat_b):
        b_id = nat_b.host.peer_id
        info = await nat_a.connect(b_id, nat_b.addrs())
        assert info.path == RELAY
        assert await echo_through(nat_a.host, b_id)
        rtt = await nat_a.measure_rtt(b_id)
        nat_a.record_transfer(b_id, 4 << 20, 0.5)
        (row,) = nat_a.report()
        assert row["path"] == RELAY and row["rtt_s"] == rtt and row["mb_s"] == 4 * 1.048576 / 0.5


async def test_maintenance_upgrades_a_relayed_partner_later_and_forgets_dead_paths():
    async with nat_peers(punch=False) as (nat_a, nat_b):
        b_id = nat_b.host.peer_id
        assert (await nat_a.connect(b_id, nat_b.addrs())).path == RELAY
        await nat_a.maintain_once()
        assert nat_a.paths[b_id].path == TCP_PUNCH
        assert await echo_through(nat_a.host, b_id)
        await nat_a.host.disconnect(b_id)
        await nat_a.maintain_once()
        assert b_id not in nat_a.paths


async def test_a_private_peer_reserves_on_every_relay_and_publishes_each():
    async with (
        await Host.create(generate_key(), [LOOPBACK]) as r1,
        await Host.create(generate_key(), [LOOPBACK]) as r2,
        await Host.create(generate_key(), []) as b,
    ):
        relays = [NatService(r, NatConfig(serve_relay=True)) for r in (r1, r2)]
        for service in relays:
            await service.start()
        addrs = tuple(r.listen_addrs[0].with_peer_id(r.peer_id) for r in (r1, r2))
        nat_b = NatService(b, NatConfig(relays=addrs))
        await nat_b.start()
        published = {str(a).split("/p2p-circuit")[0] for a in nat_b.addrs()}
        assert published == {str(a) for a in addrs}
        for service in (*relays, nat_b):
            await service.close()


async def test_connecting_to_a_peer_that_already_reached_us_reuses_its_connection():
    async with nat_peers(punch=False) as (nat_a, nat_b):
        a_id, b_id = nat_a.host.peer_id, nat_b.host.peer_id
        assert (await nat_b.connect(a_id, nat_a.addrs())).path == RELAY
        for _ in range(300):  # the stop side registers the circuit as its handshake completes
            if a_id in nat_b.paths and b_id in nat_a.paths:
                break
            await asyncio.sleep(0.01)
        assert nat_a.paths[b_id].path == RELAY and "through a relay" in nat_a.paths[b_id].reason
        info = await nat_a.connect(b_id, nat_b.addrs())
        assert info.path == RELAY
        assert len([c for c in nat_a.host._all_conns if path_of(c) == RELAY]) == 1
        assert await echo_through(nat_a.host, b_id)


async def test_a_failed_punch_falls_back_to_the_relay_without_hanging():
    async with nat_peers() as (nat_a, nat_b):
        # No STUN server answers: neither side can learn its mapping, so the punch fails fast.
        for nat in (nat_a, nat_b):
            nat.config = dataclasses.replace(nat.config, stun_servers=(("127.0.0.1", 9),))
            nat._punch.stun_servers = [("127.0.0.1", 9)]
        b_id = nat_b.host.peer_id
        info = await nat_a.connect(b_id, nat_b.addrs())
        assert info.path == RELAY and "no punch worked" in info.reason
        assert await echo_through(nat_a.host, b_id)
