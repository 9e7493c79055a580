"""The wheel, as a user gets it: built from this tree, installed into a clean venv beside `transformers`.

Shoal installs one import package, `shoal`; its layers are folders at the repository root linked under
shoal/. Hugging Face's `transformers` 5.x pulls in a distribution whose top-level package is `kernels`, so
Shoal must neither install a top-level `kernels` nor shadow the installed one when run from a checkout.
These tests build the wheel, install it non-editable into a fresh venv (torch 2.13.0 first, as CI does),
and use it the way a user would: imports from two working directories, and `peer swarm` training a tiny
Hugging Face GPT-2 through the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # CI and `make` install this (CPU) build before the project
LAYERS = ("kernels", "transport", "dht", "gossip", "peer")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _tail(text: str, size: int = 4000) -> str:
    return text if len(text) <= size else "...\n" + text[-size:]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 600)
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


def _output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{_tail(result.stdout)}\n--- stderr\n{_tail(result.stderr)}"


def _clean_env(home: Path) -> dict[str, str]:
    """The user's environment without anything that would change what Python imports."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env.update(HF_HOME=str(home / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="160")
    return env


def _copy_ignore(folder: str, names: list[str]) -> list[str]:
    """Leave out what is not source: caches, virtual environments, build outputs, run folders."""
    top = Path(folder) == REPO
    return [
        name
        for name in names
        if name == "__pycache__"
        or name.endswith((".egg-info", ".pyc"))
        or (top and (name.startswith(".") or name in {"build", "dist", "runs"}))
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built by pip from a copy of the working tree (symlinks kept as links).

    A copy, because setuptools builds in place: it writes build/ and shoal.egg-info into the tree, and a
    build/lib left from an earlier build would put files into the wheel that the tree no longer has.
    """
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=_copy_ignore)
    dist = root / "dist"
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)])
    assert result.returncode == 0, "pip wheel failed:\n" + _output(result)
    wheels = sorted(dist.glob("shoal-*.whl"))
    assert len(wheels) == 1, (sorted(p.name for p in dist.iterdir()), _output(result))
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A clean venv (no system site-packages) with torch, then the wheel (not editable) and transformers."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    result = _run([sys.executable, "-m", "venv", str(venv)], env=_clean_env(root))
    assert result.returncode == 0, "python -m venv failed:\n" + _output(result)
    python = str(venv / "bin" / "python")
    for packages in ([TORCH], [str(wheel), "transformers"]):
        result = _run([python, "-m", "pip", "install", "--no-input", *packages], env=_clean_env(root))
        assert result.returncode == 0, f"pip install {' '.join(packages)} failed:\n" + _output(result)
    return venv


def test_the_wheel_holds_the_shoal_package_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    payload = [n for n in names if not n.split("/")[0].endswith(".dist-info")]
    outside = [n for n in payload if not n.startswith("shoal/")]
    assert not outside, f"{wheel.name} installs files outside shoal/: {outside}"
    # The layer folders are links under shoal/: their modules must be in the wheel, not the links.
    for required in ("shoal/__init__.py", "shoal/errors.py", "shoal/kernels/codec.py", "shoal/peer/cli.py"):
        assert required in payload, f"{wheel.name} lacks {required}; it holds:\n" + "\n".join(payload)
    for folder in ("natlab", "bench", "tests", "docs", "deploy", "docker"):
        assert not [n for n in payload if f"/{folder}/" in f"/{n}"], (folder, payload)
    # Every module of every layer is packaged.
    sources = {
        f"shoal/{path.relative_to(REPO).as_posix()}"
        for layer in LAYERS
        for path in (REPO / layer).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(sources - set(payload))
    assert not missing, f"{wheel.name} lacks these modules of the tree: {missing}"
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["shoal"]


IMPORT_CHECK = """
import json, sysconfig
import transformers.integrations.hub_kernels
import shoal.kernels.codec
import shoal.peer.daemon
import kernels, shoal
print(json.dumps({
    "kernels": kernels.__file__,
    "shoal": shoal.__file__,
    "site_packages": sysconfig.get_paths()["purelib"],
}))
"""


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_shoal_and_transformers_import_side_by_side(venv, tmp_path, where):
    """Plain `python -c` puts the working directory first on sys.path: from the repository root the layer
    folders sit right there, and Hugging Face's `kernels` must still be the installed one."""
    cwd = REPO if where == "repository" else tmp_path
    result = _run([str(venv / "bin" / "python"), "-c", IMPORT_CHECK], cwd=cwd, env=_clean_env(tmp_path))
    assert result.returncode == 0, f"the imports fail with cwd={cwd}:\n" + _output(result)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    site_packages = Path(found["site_packages"]).resolve()
    kernels_file = Path(found["kernels"]).resolve()
    assert kernels_file.is_relative_to(site_packages), (
        f"`kernels` came from {kernels_file}, not from the venv's {site_packages}"
    )
    assert not kernels_file.is_relative_to(REPO), f"the repository shadows `kernels`: {kernels_file}"
    if where == "elsewhere":
        shoal_file = Path(found["shoal"]).resolve()
        assert shoal_file.is_relative_to(site_packages), f"shoal came from {shoal_file}, not the wheel"


MAKE_MODEL = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

folder = sys.argv[1]
# A byte-level tokenizer with no merges: 256 tokens, one per byte (GPT-2's own byte alphabet).
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=32).save_pretrained(folder)
config = GPT2Config(
    vocab_size=256, n_positions=32, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
)
model = GPT2LMHeadModel(config)
model.save_pretrained(folder)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
"""


def test_the_installed_peer_command_trains_a_hugging_face_model(venv, tmp_path):
    env = _clean_env(tmp_path)
    model = tmp_path / "model"
    made = _run([str(venv / "bin" / "python"), "-c", MAKE_MODEL, str(model)], cwd=tmp_path, env=env)
    assert made.returncode == 0, "could not make the tiny GPT-2:\n" + _output(made)
    parameters = json.loads(made.stdout.strip().splitlines()[-1])["parameters"]

    summary_path = tmp_path / "summary.json"
    swarm_dir = tmp_path / "swarm"
    # The peers train on the default corpus (the standard library's sources), tokenized by the model's
    # tokenizer; run from the repository root, where the layer folders could shadow installed packages.
    command = [
        str(venv / "bin" / "peer"), "swarm", "--peers", "2", "--rounds", "2", "--inner-steps", "3",
        "--threads", "1", "--run", "wheel-hf", "--model", f"hf:{model}", "--dir", str(swarm_dir),
        "--json", str(summary_path),
    ]  # fmt: skip
    result = _run(command, cwd=REPO, env=env, timeout=480)
    logs = "\n".join(
        f"--- {log.name}\n{_tail(log.read_text(errors='replace'), 2000)}"
        for log in sorted(swarm_dir.glob("peer-*.log"))
    )
    output = _output(result) + "\n" + logs
    assert result.returncode == 0, "peer swarm failed:\n" + output
    assert "Summary" in result.stdout, output
    summary = json.loads(summary_path.read_text())
    report = json.dumps(summary, indent=2) + "\n" + output
    assert summary["peers"] == 2 and summary["rounds"] == 2, report
    peers = summary["per_peer"]
    assert len(peers) == 2, report
    for peer in peers:
        assert peer["exit_code"] == 0 and peer["rounds_done"] == 2, report
        assert peer["parameters"] == parameters, f"the peers did not train the model in {model}:\n{report}"
        assert peer["eval_loss_end"] is not None, report
    assert sum(peer["rounds_swapped"] for peer in peers) >= 1, "no round swapped updates:\n" + report
    assert summary["bytes_per_peer_per_round"] > 0, report
