"""The Kubernetes manifests: they parse, and every image, port, ConfigMap key, Secret key and command
line they name exists: images our Dockerfiles build, ports those images expose, keys the ConfigMap and
the kustomization's secretGenerator hold, options `peer join` accepts, a config `peer join` loads."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from shoal.peer.addresses import parse_address
from shoal.peer.cli import join
from shoal.peer.config import load_config
from shoal.transport.identity import load_key_file

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# image reference -> the Dockerfile that builds it
IMAGES = {
    f"shoal/peer:{VERSION}": ROOT / "docker" / "Dockerfile",
    f"shoal/peer:{VERSION}-cuda": ROOT / "docker" / "Dockerfile.cuda",
}
WORKLOAD_KINDS = ("StatefulSet", "Deployment", "Job", "DaemonSet")


def _documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return documents


def _of_kind(kind: str) -> list[dict]:
    return [d for d in _documents() if d["kind"] == kind]


def _workloads() -> list[dict]:
    return [d for d in _documents() if d["kind"] in WORKLOAD_KINDS]


def _containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _exposed_ports(dockerfile: Path) -> set[int]:
    ports = set()
    for line in re.findall(r"^EXPOSE\s+(.+)$", dockerfile.read_text(), re.M):
        ports |= {int(port.split("/")[0]) for port in line.split()}
    return ports


def _secret_keys() -> dict[str, set[str]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {g["name"]: {Path(f).name for f in g["files"]} for g in kustomization["secretGenerator"]}


def test_every_manifest_parses_and_is_listed_in_the_kustomization():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for document in _documents():
        assert document["apiVersion"] and document["kind"] and document["metadata"]["name"]
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "shoal"


def test_bootstrap_statefulset_gpu_deployment_and_config_exist():
    (statefulset,) = _of_kind("StatefulSet")
    (deployment,) = _of_kind("Deployment")
    assert statefulset["metadata"]["name"] == "shoal-bootstrap"
    headless = [s for s in _of_kind("Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [statefulset["spec"]["serviceName"]]
    (gpu_container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _of_kind("ConfigMap") and _secret_keys()


def test_images_are_ones_our_dockerfiles_build_and_gpu_pods_get_the_cuda_one():
    for workload in _workloads():
        for container in _containers(workload):
            image = container["image"]
            assert image in IMAGES, f"{workload['metadata']['name']}: no Dockerfile builds {image}"
            wants_gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            assert image.endswith("-cuda") == wants_gpu, f"{container['name']} runs {image}"
    for dockerfile in IMAGES.values():
        assert dockerfile.exists()


def test_ports_are_exposed_by_the_image_and_services_point_at_pods_that_have_them():
    pods = []
    for workload in _workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        names = {}
        for container in workload["spec"]["template"]["spec"]["containers"]:
            exposed = _exposed_ports(IMAGES[container["image"]])
            for port in container.get("ports", []):
                assert port["containerPort"] in exposed, f"{container['image']} does not EXPOSE {port}"
                names[port["name"]] = port["containerPort"]
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["tcpSocket"]["port"] in names
        pods.append((labels, names, workload["spec"].get("serviceName")))
    for service in _of_kind("Service"):
        selector = {k: v for k, v in service["spec"]["selector"].items() if "pod-name" not in k}
        targets = [names for labels, names, _ in pods if selector.items() <= labels.items()]
        assert targets, f"service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in names for names in targets), port


def test_metrics_are_served_on_the_port_prometheus_is_told_to_scrape(tmp_path):
    for workload in _workloads():
        template = workload["spec"]["template"]
        (peer,) = template["spec"]["containers"]
        env = {"POD_NAME": f"{workload['metadata']['name']}-0"}
        params = _parse_join(_join_args(peer, env, tmp_path), tmp_path)
        assert params["metrics"], f"{workload['metadata']['name']} serves no metrics"
        port = int(params["metrics"].rsplit(":", 1)[1])
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert port in {p["containerPort"] for p in peer["ports"]}


def test_configmap_and_secret_keys_that_pods_mount_exist():
    config_maps = {c["metadata"]["name"]: c["data"] for c in _of_kind("ConfigMap")}
    secrets = _secret_keys()
    for workload in _workloads():
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                data = config_maps[volume["configMap"]["name"]]
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in data
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
                mode = volume["secret"].get("defaultMode", 0o644)
                assert not mode & 0o077, "identity keys must not be group- or world-readable"


def test_every_bootstrap_replica_has_its_own_key():
    (statefulset,) = _of_kind("StatefulSet")
    name, replicas = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
    (secret_volume,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    keys = _secret_keys()[secret_volume["secret"]["secretName"]]
    assert keys == {f"{name}-{ordinal}.key" for ordinal in range(replicas)}


def test_configmap_peer_toml_is_a_valid_peer_config(tmp_path):
    (config_map,) = _of_kind("ConfigMap")
    path = tmp_path / "peer.toml"
    path.write_text(config_map["data"]["peer.toml"])
    config = load_config(str(path), {})
    assert config.run_id


def _run_pod_script(container: dict, env: dict[str, str], tmp_path: Path) -> list[str]:
    """Runs a container's `sh -c` script with the image's entrypoint replaced by a recorder; returns the
    arguments it would have passed to `peer`."""
    recorder = tmp_path / "shoal-peer"
    recorder.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    recorder.chmod(0o755)
    script = container["args"][0].replace("/usr/local/bin/shoal-peer", str(recorder))
    result = subprocess.run(
        ["sh", "-c", script], env={**env, "PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _join_args(container: dict, env: dict[str, str], tmp_path: Path) -> list[str]:
    if container.get("command") == ["sh", "-c"]:
        return _run_pod_script(container, env, tmp_path)
    return list(container["args"])


def _parse_join(args: list[str], tmp_path: Path) -> dict:
    """Parses `join ...` with the real command line, the ConfigMap's file standing in for its mount."""
    (config_map,) = _of_kind("ConfigMap")
    config = tmp_path / "peer.toml"
    config.write_text(config_map["data"]["peer.toml"])
    assert args[0] == "join"
    rest = [re.sub(r"^(--config=?)?/etc/shoal/peer\.toml$", rf"\g<1>{config}", a) for a in args[1:]]
    return join.make_context("join", rest).params


def test_bootstrap_pod_zero_starts_the_run_and_the_others_join_it(tmp_path):
    (statefulset,) = _of_kind("StatefulSet")
    (peer,) = statefulset["spec"]["template"]["spec"]["containers"]
    first = _parse_join(_join_args(peer, {"POD_NAME": "shoal-bootstrap-0"}, tmp_path), tmp_path)
    second = _parse_join(_join_args(peer, {"POD_NAME": "shoal-bootstrap-1"}, tmp_path), tmp_path)
    assert first["bootstrap"] == ()
    assert len(second["bootstrap"]) == 1
    # the key the init container installs is the one the daemon is told to use
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][0].split()[-1] == first["key"] == second["key"]
    mounts = {m["mountPath"] for m in peer["volumeMounts"]}
    assert str(Path(first["key"]).parent) in mounts and first["state_dir"] in mounts
    host, port = parse_address(second["bootstrap"][0])
    assert host == f"shoal-bootstrap-0.{statefulset['spec']['serviceName']}"
    assert port in _exposed_ports(IMAGES[peer["image"]])


def test_bootstrap_peers_relay_and_answer_stun_where_volunteers_can_reach_them(tmp_path):
    (statefulset,) = _of_kind("StatefulSet")
    (peer,) = statefulset["spec"]["template"]["spec"]["containers"]
    params = _parse_join(_join_args(peer, {"POD_NAME": "shoal-bootstrap-0"}, tmp_path), tmp_path)
    assert params["serve_relay"] and params["serve_stun"]
    stun = {(p["protocol"], p["name"]) for p in peer["ports"] if p["containerPort"] == params["serve_stun"]}
    assert {protocol for protocol, _ in stun} == {"UDP", "TCP"}
    public = next(s for s in _of_kind("Service") if s["spec"].get("type") == "LoadBalancer")
    forwarded = {(p["protocol"], p["targetPort"]) for p in public["spec"]["ports"]}
    assert stun <= forwarded


def test_gpu_peers_join_through_bootstrap_names_that_exist(tmp_path):
    (statefulset,) = _of_kind("StatefulSet")
    (deployment,) = _of_kind("Deployment")
    (peer,) = deployment["spec"]["template"]["spec"]["containers"]
    params = _parse_join(_join_args(peer, {}, tmp_path), tmp_path)
    names = {
        f"{statefulset['metadata']['name']}-{i}.{statefulset['spec']['serviceName']}"
        for i in range(statefulset["spec"]["replicas"])
    }
    hosts = {parse_address(address)[0] for address in params["bootstrap"]}
    assert hosts and hosts <= names


def test_identity_init_container_leaves_a_key_the_daemon_accepts(tmp_path):
    """Runs the init container's copy step on a key make_keys.py made, as the pod would."""
    (statefulset,) = _of_kind("StatefulSet")
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "kustomization.yaml").write_text((K8S / "kustomization.yaml").read_text())
    made = subprocess.run(
        [sys.executable, str(K8S / "make_keys.py"), "--dir", str(tmp_path / "k8s")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert made.count("shoal-bootstrap-") == statefulset["spec"]["replicas"]
    keys_dir = tmp_path / "k8s" / "keys"
    state = tmp_path / "state"
    state.mkdir()
    script = (
        init["args"][0].replace("/etc/shoal/keys", str(keys_dir)).replace("/var/lib/shoal/state", str(state))
    )
    env = {"POD_NAME": "shoal-bootstrap-1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-c", script], env=env, check=True)
    copied = state / "key"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    load_key_file(copied)  # refuses group/world-readable or malformed keys
    assert copied.read_bytes() == (keys_dir / "shoal-bootstrap-1.key").read_bytes()
    # a second run keeps the identities it made
    again = subprocess.run(
        [sys.executable, str(K8S / "make_keys.py"), "--dir", str(tmp_path / "k8s")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert again == made


@pytest.mark.parametrize("document", _documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_pods_run_unprivileged(document):
    if document["kind"] not in WORKLOAD_KINDS:
        return
    spec = document["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for container in _containers(document):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context.get("privileged", False)
