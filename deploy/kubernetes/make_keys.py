"""Make one Ed25519 identity key per bootstrap replica for the Secret `shoal-bootstrap-keys`.

    python deploy/kubernetes/make_keys.py            # writes deploy/kubernetes/keys/shoal-bootstrap-N.key

It reads the key names from kustomization.yaml's secretGenerator, so the keys always match what the
StatefulSet mounts; existing keys are kept (an identity is never overwritten). It prints each pod's
PeerID: volunteers join with /dns4/<public name>/tcp/4701/p2p/<PeerID>.

It needs only Shoal's base install (`pip install` of the wheel or the repository, no extras): it reads
kustomization.yaml with the small reader below instead of a YAML library.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from shoal.transport.identity import generate_key, load_key_file, peer_id_from_key, write_key_file

HERE = Path(__file__).resolve().parent
SECRET_NAME = "shoal-bootstrap-keys"

Node = str | list["Node"] | dict[str, "Node"]
# `key:` or `key: value`; a plain scalar such as `keys/a.key` or `http://x` is not a mapping entry
_ENTRY = re.compile(r"""^("[^"]*"|'[^']*'|[^\s"'#:\[\]{}][^:#]*?):(?:\s+(.*))?$""")


def _scalar(text: str) -> Node:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):  # a flow sequence of plain scalars: [a, b]
        return [_scalar(item.strip()) for item in text[1:-1].split(",") if item.strip()]
    return text


def _lines(text: str) -> list[tuple[int, str]]:
    """(indent, content) of each line that holds something, comments removed."""
    lines = []
    for raw in text.splitlines():
        content = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if content.strip() and content.strip() != "---":
            lines.append((len(content) - len(content.lstrip(" ")), content.strip()))
    return lines


def _block(lines: list[tuple[int, str]], pos: int, indent: int) -> tuple[Node, int]:
    """The block sequence, block mapping or scalar whose lines start at lines[pos], at `indent`."""
    text = lines[pos][1]
    if text == "-" or text.startswith("- "):
        items: list[Node] = []
        while pos < len(lines) and lines[pos][0] == indent and (lines[pos][1] + " ").startswith("- "):
            dash = lines[pos][1]
            rest = dash[1:].lstrip()
            if rest:  # `- value` or `- key: value`: the item's content starts after the dash and its spaces
                lines[pos] = (indent + len(dash) - len(rest), rest)
                item, pos = _block(lines, pos, lines[pos][0])
            elif pos + 1 < len(lines) and lines[pos + 1][0] > indent:
                item, pos = _block(lines, pos + 1, lines[pos + 1][0])
            else:
                item, pos = "", pos + 1
            items.append(item)
        return items, pos
    if not _ENTRY.match(text):
        return _scalar(text), pos + 1
    mapping: dict[str, Node] = {}
    while pos < len(lines) and lines[pos][0] == indent and (match := _ENTRY.match(lines[pos][1])):
        key, value = str(_scalar(match[1])), match[2]
        pos += 1
        if value:
            mapping[key] = _scalar(value)
        elif pos < len(lines) and (
            lines[pos][0] > indent
            # a sequence may sit at its key's own indent (`files:` then `- a`)
            or (lines[pos][0] == indent and (lines[pos][1] + " ").startswith("- "))
        ):
            mapping[key], pos = _block(lines, pos, lines[pos][0])
        else:
            mapping[key] = ""
    return mapping, pos


def read_yaml(text: str) -> Node:
    """The block-style YAML subset kustomization.yaml is written in (mappings, sequences, plain and
    quoted scalars, flow sequences of scalars), every scalar as a string: what PyYAML's BaseLoader reads."""
    lines = _lines(text)
    if not lines:
        return ""
    document, pos = _block(lines, 0, lines[0][0])
    if pos != len(lines):
        raise ValueError(f"cannot read line {pos + 1} of the document: {lines[pos][1]!r}")
    return document


def key_files(kustomization: Path) -> list[str]:
    """The file names the secretGenerator `shoal-bootstrap-keys` packs, relative to the kustomization."""
    document = read_yaml(kustomization.read_text())
    generators = document.get("secretGenerator", []) if isinstance(document, dict) else []
    for generator in generators if isinstance(generators, list) else []:
        if isinstance(generator, dict) and generator.get("name") == SECRET_NAME:
            files = generator.get("files", [])
            return [str(f) for f in files] if isinstance(files, list) else []
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
