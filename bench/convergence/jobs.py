"""The benchmark's unit of work, importable by worker processes: one (mode, R, seed, method, overrides)."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from bench.convergence import cache
from bench.convergence.runs import OutOfTime, Result, run_outer, run_synchronous
from bench.convergence.sim import Batches, SimConfig, initial_weights
from shoal.gossip.outer.methods import OuterConfig
from shoal.kernels.codec import CodecConfig
from shoal.peer.worker.data import load_stdlib_corpus
from shoal.peer.worker.model import GPTConfig

SYNC = ("single", "ddp")


def sim_config(mode: str, seed: int, peers: int | None = None) -> SimConfig:
    """The mode's config; `peers` replaces its R (every worker keeps its batch: tokens grow with R)."""
    cfg = _mode_config(mode, seed)
    return cfg if peers is None else replace(cfg, replicas=peers)


def _mode_config(mode: str, seed: int) -> SimConfig:
    if mode == "full":  # d=128, L=4, T=128, R=8, 3 seeds (30–60 min on an idle box)
        # (docs/outer-methods.md, Convergence benchmark configuration)
        return SimConfig(
            model=GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
            replicas=8,
            inner_steps=16,
            total_steps=1600,
            seed=seed,
        )
    if mode == "smoke":  # seconds: exercises every code path, measures nothing
        return SimConfig(
            model=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
            replicas=4,
            batch=2,
            inner_steps=2,
            total_steps=8,
            eval_windows=4,
            eval_every=2,
            seed=seed,
        )
    return SimConfig(seed=seed)  # quick / sweep: the CI config (docs/outer-methods.md, same section)


def outer_config(name: str, overrides: dict | None = None) -> OuterConfig | None:
    """The method's tuned OuterConfig with `overrides` applied (`topk`: the codec's density); SYNC: None."""
    if name in SYNC:
        return None
    overrides = dict(overrides or {})
    if "topk" in overrides:  # codec density: kept entries per 64x64 tile
        overrides["codec"] = CodecConfig(topk_per_tile=overrides.pop("topk"))
    return OuterConfig.tuned(name, **overrides)


def run_method(
    name: str,
    cfg: SimConfig,
    batches: Batches,
    init: dict,
    deadline: float | None = None,
    overrides: dict | None = None,
) -> Result:
    outer = outer_config(name, overrides)
    if outer is None:
        return run_synchronous(name, cfg, batches, init, deadline)
    return run_outer(name, cfg, batches, init, outer, deadline)


_DATA: dict[tuple[str, int, int | None], tuple[SimConfig, Batches, dict, str]] = {}


def run_data(mode: str, seed: int, peers: int | None) -> tuple[SimConfig, Batches, dict, str]:
    """The config, batches, initial weights and data digest of (mode, seed, R), built once per process."""
    key = (mode, seed, peers)
    if key not in _DATA:
        cfg = sim_config(mode, seed, peers)
        batches = Batches(load_stdlib_corpus(), cfg)
        _DATA[key] = (cfg, batches, initial_weights(cfg), cache.data_digest(batches))
    return _DATA[key]


def run_key(mode: str, seed: int, name: str, overrides: dict | None, peers: int | None) -> str:
    cfg, _, _, data = run_data(mode, seed, peers)
    return cache.run_key(cfg, name, outer_config(name, overrides), data)


def job_init() -> None:
    # One thread per process: on a busy machine two torch threads per process ran 14x slower than one
    # (1.6 k vs 22 k tok/s measured here); parallelism comes from running methods in separate processes.
    torch.set_num_threads(1)


def job(
    mode: str,
    seed: int,
    name: str,
    overrides: dict | None,
    peers: int | None,
    deadline: float | None,
    key: str,
) -> dict | None:
    """One run in a worker process, stored in the cache under `key` (the parent's, computed before the run
    started) when it finishes; None when --budget ran out first."""
    cfg, batches, init, _ = run_data(mode, seed, peers)
    try:
        res = run_method(name, cfg, batches, init, deadline, overrides).to_json()
    except OutOfTime:
        return None
    about = {"mode": mode, "method": name, "overrides": overrides, "seed": seed, "peers": cfg.replicas}
    cache.store(key, res, {**about, "code": cache.code_version(), "at": time.time()})
    return res
