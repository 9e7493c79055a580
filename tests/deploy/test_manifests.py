"""The Kubernetes manifests: they parse, and every image, port, ConfigMap key, Secret key and command
line they name exists: images our Dockerfiles build (through the kustomization's `images`, as
deploy/build-images.sh names them), ports those images expose, keys the ConfigMap and the kustomization's
secretGenerator hold, options `peer join` accepts, a config `peer join` loads. make_keys.py runs on the
base install alone (no PyYAML)."""

from __future__ import annotations

import ast
import base64
import importlib.util
import os
import re
import shutil
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
BUILD_IMAGES = ROOT / "deploy" / "build-images.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# the manifests' image placeholder -> the Dockerfile that builds it (kustomization.yaml's `images` maps
# each placeholder to the name deploy/build-images.sh pushes)
IMAGES = {
    "shoal-peer": ROOT / "docker" / "Dockerfile",
    "shoal-peer-cuda": ROOT / "docker" / "Dockerfile.cuda",
}
# the tag build-images.sh gives each Dockerfile's image, for a TAG
TAG_SUFFIX = {ROOT / "docker" / "Dockerfile": "", ROOT / "docker" / "Dockerfile.cuda": "-cuda"}
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


def _image_mapping() -> dict[str, str]:
    """kustomization.yaml's `images`: placeholder -> the image reference kustomize puts in its place."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}


def test_kustomization_maps_every_image_placeholder_to_a_registry_image_of_this_version():
    """The manifests name only placeholders (no registry holds Shoal's images); the kustomization turns
    each into REGISTRY/shoal-peer:VERSION or :VERSION-cuda, REGISTRY one value to set for both."""
    used = {c["image"] for w in _workloads() for c in _containers(w)}
    mapping = _image_mapping()
    assert used == set(mapping) == set(IMAGES)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all(set(i) == {"name", "newName", "newTag"} for i in kustomization["images"])
    assert all(isinstance(i["newTag"], str) for i in kustomization["images"]), "quote the tags"
    registries = set()
    for placeholder, reference in mapping.items():
        assert ":" not in placeholder and "/" not in placeholder, placeholder
        registry, _, tail = reference.rpartition("/")
        assert tail == f"shoal-peer:{VERSION}{TAG_SUFFIX[IMAGES[placeholder]]}", reference
        registries.add(registry)
    assert len(registries) == 1, "both images come from one registry"


def _tool_dir(tmp_path: Path, *tools: str) -> Path:
    """A PATH folder holding only `tools` (links to this machine's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def _build_images(tmp_path: Path, *args: str, docker: bool = True) -> subprocess.CompletedProcess:
    """Runs build-images.sh with a `docker` that records its arguments (one call a line) in docker.log."""
    bin_dir = _tool_dir(tmp_path, "awk", "dirname")
    if docker:
        fake = bin_dir / "docker"
        fake.write_text(f'#!/bin/sh\necho "$*" >>{tmp_path}/docker.log\n')
        fake.chmod(0o755)
    return subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(BUILD_IMAGES), *args],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_build_images_names_what_the_kustomization_runs_and_builds_each_from_its_dockerfile(tmp_path):
    mapping = _image_mapping()
    registry = {reference.rpartition("/")[0] for reference in mapping.values()}.pop()
    result = _build_images(tmp_path, "registry.example.org:5000/team/")  # a trailing / is dropped
    assert result.returncode == 0, result.stderr
    names = result.stdout.splitlines()
    # with the kustomization's REGISTRY set to the one given, it names exactly the images built
    expected = {p: r.replace(registry, "registry.example.org:5000/team", 1) for p, r in mapping.items()}
    assert sorted(names) == sorted(expected.values())
    calls = (tmp_path / "docker.log").read_text().splitlines()
    for placeholder, name in expected.items():
        dockerfile = IMAGES[placeholder].relative_to(ROOT)
        assert f"build -f {dockerfile} -t {name} ." in calls
        assert f"push {name}" in calls
    assert f"kustomize edit set image shoal-peer={expected['shoal-peer']}" in result.stderr


def test_build_images_takes_a_tag_and_skips_the_push_when_told(tmp_path):
    result = _build_images(tmp_path, "--no-push", "reg.example", "2.0rc1")
    assert result.returncode == 0, result.stderr
    names = ["reg.example/shoal-peer:2.0rc1", "reg.example/shoal-peer:2.0rc1-cuda"]
    assert result.stdout.splitlines() == names
    calls = (tmp_path / "docker.log").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["info", "build", "build"]


def test_build_images_fails_clearly_without_docker_or_arguments(tmp_path):
    result = _build_images(tmp_path, "reg.example", docker=False)
    assert result.returncode == 1
    assert "docker not found" in result.stderr and not result.stdout
    result = _build_images(tmp_path)
    assert result.returncode == 2 and "usage: deploy/build-images.sh" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_build_images_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(BUILD_IMAGES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


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


# Runs make_keys.py as `python make_keys.py ARGS` would, in an interpreter where `import yaml` fails: the
# base install has no PyYAML (only the dev extras bring it).
_WITHOUT_YAML = (
    "import runpy, sys; sys.modules['yaml'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _make_keys(directory: Path) -> str:
    """Runs make_keys.py on a kustomization folder without PyYAML; returns what it prints."""
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_YAML, str(K8S / "make_keys.py"), "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def _load_make_keys():
    spec = importlib.util.spec_from_file_location("make_keys", K8S / "make_keys.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_keys_imports_only_the_standard_library_and_shoal():
    tree = ast.parse((K8S / "make_keys.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names | {"shoal"}}
    assert not outside, f"make_keys.py needs more than the base install: {outside}"


KUSTOMIZATION_VARIANTS = [
    # the sequence at its key's indent, quoted scalars, a flow sequence, comments, a document marker
    "---\nresources: [a.yaml, 'b.yaml']\nsecretGenerator:\n- name: \"shoal-bootstrap-keys\" # x\n"
    "  files:\n  - keys/a.key\n  - 'keys/b.key'\n- name: other\n  type: Opaque\n",
    # nested mappings, dashes with extra spaces, empty values, a list of mappings after a scalar key
    "secretGenerator:\n    -   name: shoal-bootstrap-keys\n        files:\n            - keys/x.key\n"
    "        options:\n            labels:\n                a: b\n        literals:\n"
    "images:\n  - name: shoal-peer\n    newTag: '1'\n",
]


@pytest.mark.parametrize("text", [(K8S / "kustomization.yaml").read_text(), *KUSTOMIZATION_VARIANTS])
def test_make_keys_reads_the_kustomization_as_yaml_does(text):
    assert _load_make_keys().read_yaml(text) == yaml.load(text, Loader=yaml.BaseLoader)


def test_identity_init_container_leaves_a_key_the_daemon_accepts(tmp_path):
    """Runs the init container's copy step on a key make_keys.py made, as the pod would."""
    (statefulset,) = _of_kind("StatefulSet")
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "kustomization.yaml").write_text((K8S / "kustomization.yaml").read_text())
    made = _make_keys(tmp_path / "k8s")
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
    assert _make_keys(tmp_path / "k8s") == made


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize() is None, reason="neither kustomize nor kubectl is installed")
def test_kustomize_renders_the_registry_images_and_the_secret_of_the_keys_make_keys_made(tmp_path):
    """What `kubectl apply -k` would send: every pod runs the image `images` names, and the Secret holds
    each key make_keys.py made (run without PyYAML), under the name the pods mount."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("keys", "__pycache__"))
    made = _make_keys(tmp_path / "k8s")
    rendered = subprocess.run(
        [*_kustomize(), str(tmp_path / "k8s")], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    mapping = _image_mapping()
    for workload in (d for d in documents if d["kind"] in WORKLOAD_KINDS):
        for container in _containers(workload):
            assert container["image"] in mapping.values(), container["image"]
    assert {c["image"] for w in _workloads() for c in _containers(w)} == set(mapping)
    (secret,) = [d for d in documents if d["kind"] == "Secret"]
    assert secret["metadata"] == {"name": "shoal-bootstrap-keys", "namespace": "shoal"}
    keys = tmp_path / "k8s" / "keys"
    assert {name: base64.b64decode(value) for name, value in secret["data"].items()} == {
        path.name: path.read_bytes() for path in keys.iterdir()
    }
    assert made.count("shoal-bootstrap-") == len(secret["data"])


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
