"""Through real NAT routers: Linux namespaces, veths, a bridge and nftables NAT (root only).

The lab's NAT types are checked first (so a broken lab cannot pass for working NAT traversal), then
peers in separate processes behind them connect the way the path policy says they should.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from natlab.lab import (
    NAT_TYPES,
    PUBLIC_IP,
    PUBLIC_IP_2,
    TURN_PASSWORD,
    TURN_PORT,
    TURN_USER,
    NatLab,
    unavailable_reason,
)
from natlab.pair import STUN_PORT, run_pair, start_relay

pytestmark = [
    pytest.mark.slow,  # real processes in network namespaces
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

# Runs in a private host: STUN over TCP from one local port to both public addresses (the mappings),
# then a listener on that port that reports whether anything connected (the filtering).
PROBE = """
import asyncio, socket, sys
from shoal.transport.nat import stun
async def main():
    first, port = await stun.query_tcp(("{ip1}", {stun}))
    second, _ = await stun.query_tcp(("{ip2}", {stun}), port)
    print(first[1], second[1], port, flush=True)
    listener = stun.reusable_tcp_socket(port)
    listener.listen(4)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 3.0)
        print("inbound", flush=True)
    except TimeoutError:
        print("filtered", flush=True)
asyncio.run(main())
"""

KNOCK = """
import socket, sys
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect(("{ip}", {port}))
except OSError:
    pass
"""


@pytest.fixture(scope="module")
def lab():
    with NatLab(list(NAT_TYPES)) as lab:
        yield lab


@pytest.fixture(scope="module")
def relay(lab):
    return start_relay(lab)


def test_nat_types_map_and_filter_as_named(lab, relay):
    for site in lab.sites:
        code = PROBE.format(ip1=PUBLIC_IP, ip2=PUBLIC_IP_2, stun=STUN_PORT)
        probe = lab.spawn_python(site.host_ns, ["-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert probe.stdout is not None
        first, second, local = map(int, probe.stdout.readline().split())
        # An unsolicited connection from a public address the host never sent to, to the mapped port.
        lab.exec(lab.pub_ns, [sys.executable, "-c", KNOCK.format(ip=site.wan_ip, port=first)], check=False)
        verdict = probe.stdout.readline().decode().strip()
        lab.stop(probe)
        if site.nat_type == "symmetric":
            assert first != second, "a symmetric NAT must map each destination to its own port"
        else:
            assert first == second == local, f"{site.nat_type} must keep one mapping (port-preserving here)"
        expected = "inbound" if site.nat_type == "eim-eif" else "filtered"
        assert verdict == expected, f"{site.nat_type}: unsolicited inbound was {verdict}"


def test_coturn_answers_stun_from_behind_a_nat(lab):
    if subprocess.run(["which", "turnserver"], capture_output=True).returncode:
        pytest.skip("coturn is not installed (apt-get install -y coturn)")
    lab.start_coturn()
    code = (
        f"import asyncio\nfrom transport.nat import stun\n"
        f"print(asyncio.run(stun.query_udp(('{PUBLIC_IP}', {TURN_PORT})))[0])"
    )
    for _ in range(50):  # coturn takes a moment to bind
        out = lab.exec(lab.sites[1].host_ns, [sys.executable, "-c", code], check=False).strip()
        if out:
            break
        time.sleep(0.1)
    assert out == lab.sites[1].wan_ip


# The pairs the judgement names: each must end on the path the policy promises.
@pytest.mark.parametrize(
    ("a", "b", "paths"),
    [
        ("eim-apdf", "eim-apdf", {"tcp-punch"}),
        ("eim-apdf", "symmetric", {"tcp-punch"}),  # port prediction
        ("eim-eif", "symmetric", {"direct"}),
        ("symmetric", "eim-eif", {"direct"}),
        ("symmetric", "symmetric", {"relay"}),
    ],
)
def test_pair_connects_on_the_expected_path_and_moves_data(lab, relay, a, b, paths):
    lab.set_nat(0, a)
    lab.set_nat(1, b)
    result = run_pair(lab, relay, transfer_bytes=2 << 20)
    # Dial-back verdicts: only a full-cone NAT forwards the relay's unsolicited dial to the peer.
    assert result.reachability == tuple("public" if t == "eim-eif" else "private" for t in (a, b))
    assert result.connected, result.reason
    assert result.path in paths, f"{a}/{b} ended on {result.path}: {result.reason}"
    assert result.mb_s and result.mb_s > 0


def test_ice_alone_gets_through_two_port_restricted_nats_with_the_secure_channel_on_top(lab, relay):
    lab.set_nat(0, "eim-apdf")
    lab.set_nat(1, "eim-apdf")
    result = run_pair(lab, relay, transfer_bytes=1 << 20, methods="ice")
    assert result.connected and result.path == "ice", result.reason
    assert result.mb_s and result.mb_s > 0


def test_ice_through_coturn_joins_two_symmetric_nats(lab, relay):
    if subprocess.run(["which", "turnserver"], capture_output=True).returncode:
        pytest.skip("coturn is not installed (apt-get install -y coturn)")
    lab.start_coturn()  # a second coturn fails to bind and exits; the first keeps serving
    lab.set_nat(0, "symmetric")
    lab.set_nat(1, "symmetric")
    turn = f"{PUBLIC_IP}:{TURN_PORT}:{TURN_USER}:{TURN_PASSWORD}"
    result = run_pair(lab, relay, transfer_bytes=256 << 10, methods="ice", turn=turn, retry_upgrade=False)
    assert result.connected and result.path == "ice", result.reason
    assert "through TURN" in result.reason  # two symmetric NATs: only a TURN relay candidate can work


@pytest.mark.skipif(shutil.which("ethtool") is None, reason="a delayed lab needs ethtool (apt-get)")
def test_punches_time_their_syns_across_a_50_ms_round_trip():
    with NatLab(["eim-apdf", "symmetric"], delay_ms=12.5, prefix=f"nd{os.getpid() % 10000}") as slow:
        relay = start_relay(slow)
        for b in ("symmetric", "eim-apdf"):
            slow.set_nat(1, b)
            result = run_pair(slow, relay, transfer_bytes=256 << 10)
            assert result.connected and result.path == "tcp-punch", result.reason
            assert result.rtt_s is not None and result.rtt_s >= 0.05  # the delay line really delays


def test_lab_leaves_no_namespace_behind():
    with NatLab(["eim-apdf"], prefix="nlgone") as lab:
        assert lab.sites and lab.pub_ns
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "nlgone-" not in out
