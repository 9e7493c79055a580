"""Finished runs, one file per (config, method and settings, seed, data, code version) in cache/.

The benchmark is deterministic per seed (one torch thread per process, the same batches for every method), so
a run's result depends only on its key, never on the machine's load: results accumulate across invocations,
and a stopped benchmark picks up where it stopped. The key holds the simulator's config (R and the seed
included), the method with its resolved OuterConfig (the tuned values with the overrides applied, so that a
variant and a default with the same settings share a run), a digest of the very tokens the run trains and
evaluates on (the corpus and the worker's data pipeline), and the code version: a hash of the syntax trees
(not the formatting, comments or docstrings) of the modules a run executes (the outer methods, the benchmark's
runs, simulator and research methods, the codec, the worker's model) and the torch and numpy versions. The
tuned values' `register(...)` calls and DEFAULT_METHOD are left out of the code version: the resolved config
carries what they change. `__main__` and this module only choose, fetch and print runs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.convergence.sim import Batches, SimConfig
from shoal.gossip.outer.methods import OuterConfig

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(__file__).resolve().parent / "cache"
CODE = (
    "gossip/outer/*.py",
    "bench/convergence/jobs.py",
    "bench/convergence/runs.py",
    "bench/convergence/sim.py",
    "bench/convergence/research/*.py",
    "kernels/*.py",
    "peer/worker/model.py",
)
# gossip/outer modules no simulated run imports (the partner guard and its attacks): tuning the guard must not
# throw away hours of `--full` runs that never execute it. tests/outer/test_bench_smoke.py checks the claim.
NOT_RUN = ("gossip/outer/guard.py", "gossip/outer/guarded_step.py", "gossip/outer/byzantine.py")


@functools.cache
def code_version() -> str:
    """16 hex digits over the syntax trees of the modules a run executes, and the torch and numpy versions."""
    digest = hashlib.sha256(f"torch {torch.__version__} numpy {np.__version__}".encode())
    for pattern in CODE:
        for path in sorted(p for p in ROOT.glob(pattern) if str(p.relative_to(ROOT)) not in NOT_RUN):
            tree = ast.dump(_code_only(ast.parse(path.read_text(encoding="utf-8"))))
            digest.update(f"\0{path.relative_to(ROOT)}\0{tree}".encode())
    return digest.hexdigest()[:16]


def _is_setting(node: ast.stmt) -> bool:
    """A top-level `register(...)` call (a method's tuned values) or the DEFAULT_METHOD assignment."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return isinstance(node.value.func, ast.Name) and node.value.func.id == "register"
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "DEFAULT_METHOD" for t in node.targets)
    return False


def _code_only(tree: ast.Module) -> ast.Module:
    """The tree without docstrings and without the settings the run key carries resolved."""
    tree.body = [node for node in tree.body if not _is_setting(node)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0].value if node.body and isinstance(node.body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def data_digest(batches: Batches) -> str:
    """16 hex digits over every token a run trains and evaluates on."""
    digest = hashlib.sha256()
    for tensor in (batches.x, batches.y, batches.eval_x, batches.eval_y):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def run_key(cfg: SimConfig, method: str, settings: OuterConfig | None, data: str) -> str:
    """The cache key of one run: config (seed and R included), method and its resolved settings (None for
    `single` and `ddp`), the data digest and the code version."""
    what = {
        "config": {**asdict(cfg), "model": asdict(cfg.model)},
        "method": method,
        "settings": None if settings is None else asdict(settings),
        "data": data,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(key: str) -> dict | None:
    path = CACHE_DIR / f"{key}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["result"]
    except (OSError, ValueError, KeyError):
        return None  # a torn or foreign file: run again


def store(key: str, result: dict, about: dict) -> None:
    """Write atomically (rename), so that a concurrent or interrupted benchmark never reads half a file."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"about": about, "result": result}))
    tmp.replace(CACHE_DIR / f"{key}.json")
