"""A seconds-long run of the convergence harness: the JSON the issue asks for, from real components."""

import time

import pytest

from bench.convergence.__main__ import choose_default
from bench.convergence.jobs import run_method, sim_config
from bench.convergence.sim import Batches, initial_weights
from shoal.peer.worker.data import load_stdlib_corpus

KEYS = {"eval_loss", "spread", "bytes_per_peer_per_round", "bits_per_param"}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's SDPA fallback (see sim.py)
def test_smoke_run_reports_every_key_and_sparse_gossip_sends_far_fewer_bytes_than_diloco():
    cfg = sim_config("smoke", 0)
    batches = Batches(load_stdlib_corpus(), cfg)
    init = initial_weights(cfg)
    deadline = time.time() + 600
    results = {
        m: run_method(m, cfg, batches, init, deadline).to_json() for m in ("diloco", "gossip-sparseloco")
    }
    for r in results.values():
        assert r.keys() >= KEYS
        assert r["eval_loss"] < 5.55  # learned something from ln(256) = 5.545 at init
    assert results["diloco"]["spread"] < 1e-8  # identical replicas up to summation order
    assert 0 < results["gossip-sparseloco"]["spread"] < 0.01
    ratio = (
        results["gossip-sparseloco"]["bytes_per_peer_per_round"]
        / results["diloco"]["bytes_per_peer_per_round"]
    )
    assert ratio < 0.05
    assert results["gossip-sparseloco"]["bits_per_param"] < 1.0
    assert choose_default(results) == "gossip-sparseloco"
