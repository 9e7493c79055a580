"""Make one Ed25519 identity key per bootstrap replica for the Secret `shoal-bootstrap-keys`.

    python deploy/kubernetes/make_keys.py            # writes deploy/kubernetes/keys/shoal-bootstrap-N.key

It reads the key names from kustomization.yaml's secretGenerator, so the keys always match what the
StatefulSet mounts; existing keys are kept (an identity is never overwritten). It prints each pod's
PeerID: volunteers join with /dns4/<public name>/tcp/4701/p2p/<PeerID>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from shoal.transport.identity import generate_key, load_key_file, peer_id_from_key, write_key_file

HERE = Path(__file__).resolve().parent
SECRET_NAME = "shoal-bootstrap-keys"


def key_files(kustomization: Path) -> list[str]:
    """The file names the secretGenerator `shoal-bootstrap-keys` packs, relative to the kustomization."""
    document = yaml.safe_load(kustomization.read_text())
    for generator in document.get("secretGenerator", []):
        if generator.get("name") == SECRET_NAME:
            return list(generator.get("files", []))
    raise SystemExit(f"{kustomization} has no secretGenerator named {SECRET_NAME}")


def make_keys(directory: Path) -> dict[str, str]:
    """Creates the missing keys under `directory`; returns file name -> PeerID for all of them."""
    ids = {}
    for name in key_files(directory / "kustomization.yaml"):
        path = directory / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            write_key_file(path, generate_key())
        ids[name] = str(peer_id_from_key(load_key_file(path)))
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=HERE, help="the kustomization's folder")
    args = parser.parse_args()
    for name, peer_id in make_keys(args.dir).items():
        print(f"{name}: {peer_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
