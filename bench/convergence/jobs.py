"""The benchmark's unit of work, importable by worker processes: one (mode, seed, method, overrides) run."""

from __future__ import annotations

import torch

from bench.convergence.runs import OutOfTime, Result, run_outer, run_synchronous
from bench.convergence.sim import Batches, SimConfig, initial_weights
from shoal.gossip.outer.methods import OuterConfig
from shoal.kernels.codec import CodecConfig
from shoal.peer.worker.data import load_stdlib_corpus
from shoal.peer.worker.model import GPTConfig

SYNC = ("single", "ddp")


def sim_config(mode: str, seed: int) -> SimConfig:
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


def run_method(
    name: str, cfg: SimConfig, batches: Batches, init: dict, deadline: float, overrides: dict | None = None
) -> Result:
    if name in SYNC:
        return run_synchronous(name, cfg, batches, init, deadline)
    overrides = dict(overrides or {})
    if "topk" in overrides:  # codec density: kept entries per 64x64 tile
        overrides["codec"] = CodecConfig(topk_per_tile=overrides.pop("topk"))
    return run_outer(name, cfg, batches, init, OuterConfig.tuned(name, **overrides), deadline)


_CACHE: dict[tuple[str, int], tuple[SimConfig, Batches, dict]] = {}


def job_init() -> None:
    # One thread per process: on a busy machine two torch threads per process ran 14x slower than one
    # (1.6 k vs 22 k tok/s measured here); parallelism comes from running methods in separate processes.
    torch.set_num_threads(1)


def job(mode: str, seed: int, name: str, overrides: dict | None, deadline: float) -> tuple[str, dict | None]:
    """One (method, seed, overrides) run in a worker process; None when the wall-clock guard fired."""
    key = (mode, seed)
    if key not in _CACHE:
        cfg = sim_config(mode, seed)
        _CACHE[key] = (cfg, Batches(load_stdlib_corpus(), cfg), initial_weights(cfg))
    cfg, batches, init = _CACHE[key]
    try:
        res = run_method(name, cfg, batches, init, deadline, overrides)
    except OutOfTime:
        return name, None
    return name, res.to_json()
