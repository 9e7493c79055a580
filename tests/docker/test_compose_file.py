"""The compose swarm's file and scripts, checked without an engine: the topology the README promises
(public bootstrap serving relay and STUN, scalable peers, one peer behind each kind of NAT router, coturn),
no privileged container, addresses that agree with each other, a public network the NAT layer counts as
public, NATed peers pointed at the bootstrap's relay, two STUN servers and coturn's TURN, and peer commands
the real `peer join` accepts."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shoal.peer.addresses import parse_address
from shoal.peer.cli import join
from shoal.peer.config import load_config
from shoal.transport.nat.paths import DOCUMENTATION_NETS

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value):
    """Compose's ${VAR:-default} with an empty environment: every default must make a valid swarm."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m[2] or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _compose() -> dict:
    return _interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


def _peer_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s["image"].startswith("shoal/peer")}


def _address_on(service: dict, network: str) -> str:
    return service["networks"][network]["ipv4_address"]


def test_swarm_has_bootstrap_scalable_peers_two_nat_routers_and_turn():
    services = _compose()["services"]
    assert {"bootstrap", "peer", "peer-eim", "peer-sym", "router-eim", "router-sym", "turn"} <= set(services)
    assert services["router-eim"]["environment"]["NAT_TYPE"] == "eim"
    assert services["router-sym"]["environment"]["NAT_TYPE"] == "symmetric"
    # `--scale peer=N` needs a service with no fixed address and no container_name
    assert "container_name" not in services["peer"]
    assert isinstance(services["peer"]["networks"], list)


def test_no_container_is_privileged_and_only_routing_services_get_net_admin():
    for name, service in _compose()["services"].items():
        assert not service.get("privileged", False), name
        assert service.get("cap_drop") == ["ALL"], name
        added = set(service.get("cap_add", []))
        assert "ALL" not in added and "SYS_ADMIN" not in added, name
        if "NET_ADMIN" in added:
            assert name.startswith(("router-", "turn")) or service["environment"].get("ROUTER"), name


def test_networks_lead_nowhere_but_need_no_host_rule():
    """No network gives the host an address (so nothing in the swarm reaches the host, nor through it your
    network or the internet); the public one is internal. The private ones must not be: dockerd's rules
    for an internal network drop, in the host's FORWARD chain, frames bridged to an off-subnet address
    (where br_netfilter filters bridged frames), which is every NATed peer's frame to its router. They
    masquerade nothing instead."""
    networks = _compose()["networks"]
    for name, network in networks.items():
        assert network["driver_opts"]["com.docker.network.bridge.inhibit_ipv4"] == "true", name
        assert network.get("driver", "bridge") == "bridge", name
    assert networks["public"]["internal"] is True
    for lan in ("lan-eim", "lan-sym"):
        assert not networks[lan].get("internal", False), lan
        assert networks[lan]["driver_opts"]["com.docker.network.bridge.enable_ip_masquerade"] == "false"


def test_every_fixed_address_is_in_its_subnet_outside_the_dynamic_range():
    compose = _compose()
    subnets = {}
    for name, network in compose["networks"].items():
        (config,) = network["ipam"]["config"]
        subnets[name] = ipaddress.ip_network(config["subnet"])
        dynamic = ipaddress.ip_network(config["ip_range"])
        assert dynamic.subnet_of(subnets[name])
    for name, service in compose["services"].items():
        if isinstance(service.get("networks"), dict):
            for network, settings in service["networks"].items():
                address = ipaddress.ip_address(settings["ipv4_address"])
                assert address in subnets[network], (name, network)
                dynamic = ipaddress.ip_network(compose["networks"][network]["ipam"]["config"][0]["ip_range"])
                assert address not in dynamic, f"{name} may collide with a scaled peer"


def test_natted_peers_route_through_their_router_to_the_public_subnet():
    compose = _compose()
    services = compose["services"]
    public = compose["networks"]["public"]["ipam"]["config"][0]["subnet"]
    for kind in ("eim", "sym"):
        peer, router = services[f"peer-{kind}"], services[f"router-{kind}"]
        (lan,) = peer["networks"]
        assert peer["environment"]["ROUTER"] == _address_on(router, lan)
        assert peer["environment"]["PUBLIC_SUBNET"] == public
        lan_subnet = compose["networks"][lan]["ipam"]["config"][0]["subnet"]
        assert router["environment"]["PRIVATE_SUBNET"] == lan_subnet
        assert router["environment"]["PUBLIC_SUBNET"] == public
        assert router["sysctls"]["net.ipv4.ip_forward"] == "1"
        assert "public" not in peer["networks"]  # reachable only through the NAT


def _turnserver_setting(name: str) -> str:
    settings = (DOCKER / "turnserver.conf").read_text().splitlines()
    (value,) = [line.split("=", 1)[1] for line in settings if line.startswith(f"{name}=")]
    return value


def test_peer_commands_parse_and_join_the_bootstraps_fixed_address():
    compose = _compose()
    services = compose["services"]
    mounts = {}  # path in the container -> file here, for --config
    for volume in compose["x-peer"]["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = str((DOCKER / source).resolve())
    bootstrap_address = _address_on(services["bootstrap"], "public")
    turn_address = _address_on(services["turn"], "public")
    turn_port = _turnserver_setting("listening-port")

    def params_of(service: dict) -> dict:
        args = [
            re.sub(r"^--config=(.*)$", lambda m: f"--config={mounts[m[1]]}", a)
            for a in service["command"][1:]
        ]
        return join.make_context("join", args).params  # raises on an unknown option

    serve_stun = params_of(services["bootstrap"])["serve_stun"]
    for name, service in _peer_services(compose).items():
        assert service["command"][0] == "join"
        params = params_of(service)
        config = load_config(params["config_file"], {"run_id": params["run_id"]})
        assert config.fail_after > config.gossip_interval * 10  # a loaded machine must not split the run
        assert params["json_events"], f"{name}: the swarm test reads --json-events"
        if name == "bootstrap":
            assert params["bootstrap"] == ()
            # the relay announces the address it listens on, so that must be the fixed public one
            assert parse_address(params["listen"]) == (bootstrap_address, 4701)
            assert params["serve_relay"] and params["serve_stun"]
            continue
        (address,) = params["bootstrap"]
        assert parse_address(address) == (bootstrap_address, 4701)
        natted = bool(service["environment"].get("ROUTER"))
        assert bool(params["relays"]) == natted, f"{name}: only NATed peers reserve a relay slot"
        if not natted:
            continue
        # behind a NAT: the bootstrap's relay, STUN at two different addresses (the bootstrap's and
        # coturn's, so that a symmetric NAT shows), TURN with coturn's credentials
        assert [parse_address(r) for r in params["relays"]] == [(bootstrap_address, 4701)]
        stun = [f"{bootstrap_address}:{serve_stun}", f"{turn_address}:{turn_port}"]
        assert sorted(params["stun"]) == sorted(stun)
        user, password = _turnserver_setting("user").split(":")
        assert params["turn"] == (f"{turn_address}:{turn_port}:{user}:{password}",)


def test_the_public_network_is_one_the_nat_layer_counts_as_public():
    """The swarm's "internet" must look public to the NAT layer (a documentation range, as in the NAT lab);
    an RFC 1918 one would make the relay announce nothing and peers publish no reachable address."""
    compose = _compose()
    public = ipaddress.ip_network(compose["networks"]["public"]["ipam"]["config"][0]["subnet"])
    assert any(public.subnet_of(ipaddress.ip_network(net)) for net in DOCUMENTATION_NETS), public
    for lan in ("lan-eim", "lan-sym"):
        assert ipaddress.ip_network(compose["networks"][lan]["ipam"]["config"][0]["subnet"]).is_private


def test_scripts_are_valid_shell():
    for script in [*SCRIPTS, DOCKER / "peer-entrypoint.sh", DOCKER / "router.sh"]:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_dockerfiles_copy_only_files_that_exist():
    for dockerfile in DOCKER.glob("Dockerfile*"):
        for line in re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(), re.M):
            for source in line.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"


def _compose_binary() -> str | None:
    work = Path(os.environ.get("SHOAL_DOCKER_WORK", "/var/lib/shoal-docker"))
    for candidate in (work / "bin" / "docker-compose", shutil.which("docker-compose")):
        if candidate and os.access(candidate, os.X_OK):
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True).stdout
            if "v2." in version:
                return str(candidate)
    return None


def test_compose_v2_accepts_the_file():
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no compose v2 binary (docker/engine.sh start installs one)")
    result = subprocess.run(
        [binary, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"},  # config needs no engine
    )
    assert result.returncode == 0, result.stderr
