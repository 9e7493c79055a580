"""docker/engine.sh's teardown, without an engine: in a scratch network namespace, lay down what dockerd
20.10 leaves behind when it stops (its iptables chains and rules in filter and nat, the FORWARD policy it
flips to DROP, docker0, a compose bridge, ip_forward=1) next to a rule of the host's own, run `engine.sh
stop`, and check the namespace is exactly as it was before, the host's own rule included."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a Docker engine

ENGINE = Path(__file__).resolve().parents[2] / "docker" / "engine.sh"

# What dockerd 20.10 with --iptables=true and one compose network (br-...) had set up, as iptables
# commands (engine.sh itself adds none).
DOCKER_LEFTOVERS = """
iptables -N DOCKER
iptables -N DOCKER-ISOLATION-STAGE-1
iptables -N DOCKER-ISOLATION-STAGE-2
iptables -N DOCKER-USER
iptables -A FORWARD -j DOCKER-USER
iptables -A FORWARD -j DOCKER-ISOLATION-STAGE-1
iptables -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
iptables -A FORWARD -o docker0 -j DOCKER
iptables -A FORWARD -i docker0 ! -o docker0 -j ACCEPT
iptables -A FORWARD -i br-0123456789ab -o br-0123456789ab -j ACCEPT
iptables -A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
iptables -A DOCKER-ISOLATION-STAGE-1 ! -s 10.77.0.0/24 -o br-0123456789ab -j DROP
iptables -A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
iptables -A DOCKER-ISOLATION-STAGE-1 -j RETURN
iptables -A DOCKER-ISOLATION-STAGE-2 -j RETURN
iptables -A DOCKER-USER -j RETURN
iptables -P FORWARD DROP
iptables -t nat -N DOCKER
iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
iptables -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
iptables -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
iptables -t nat -A DOCKER -i docker0 -j RETURN
ip link add docker0 type bridge
ip link add br-0123456789ab type bridge
sysctl -qw net.ipv4.ip_forward=1
"""

SNAPSHOT = """snapshot() {
iptables-save | sed -E '/^#/d; s/\\[[0-9]+:[0-9]+\\]//'
echo ---
nft list tables
echo ---
ip -o link show | awk -F': ' '{print $2}'
echo ---
sysctl -n net.ipv4.ip_forward
}"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a scratch network namespace with its own firewall)"
    for tool in ("unshare", "iptables", "iptables-save", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
@pytest.mark.parametrize("host_rule", ["", "iptables -A INPUT -p tcp --dport 22 -j ACCEPT"])
def test_stop_removes_what_dockerd_left_and_keeps_the_hosts_own_rules(tmp_path, host_rule):
    script = f"""
set -euo pipefail
export SHOAL_DOCKER_WORK={tmp_path}
source {ENGINE}
{SNAPSHOT}
{host_rule}
snapshot > {tmp_path}/before
save_baseline
{DOCKER_LEFTOVERS}
snapshot > {tmp_path}/during
stop
snapshot > {tmp_path}/after
"""
    result = subprocess.run(
        ["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    before, during, after = ((tmp_path / name).read_text() for name in ("before", "during", "after"))
    assert "DOCKER" in during and "docker0" in during  # the leftovers were really there
    assert after == before
    if host_rule:
        assert "--dport 22 -j ACCEPT" in after
