"""A seconds-long run of the convergence harness: the JSON the issue asks for, from real components."""

import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from bench.convergence import cache
from bench.convergence.__main__ import main, method_specs, parse_spec, pick_across, pick_at
from bench.convergence.jobs import run_key, run_method, sim_config
from bench.convergence.runs import exchange_pairs, settle, step_alone
from bench.convergence.sim import Batches, Replicas, initial_weights
from shoal.gossip.outer.methods import DEFAULT_METHOD, OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.pairing import partner_index
from shoal.peer.worker.data import load_stdlib_corpus

KEYS = {"eval_loss", "spread", "bytes_per_peer_per_round", "bits_per_param", "peers", "skipped_pairs"}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's SDPA fallback (see sim.py)
def test_smoke_run_reports_every_key_and_sparse_gossip_sends_far_fewer_bytes_than_diloco():
    cfg = sim_config("smoke", 0)
    batches = Batches(load_stdlib_corpus(), cfg)
    init = initial_weights(cfg)
    deadline = time.time() + 600
    results = {
        m: run_method(m, cfg, batches, init, deadline).to_json()
        for m in ("diloco", "gossip-sparseloco", "compressed-noloco")
    }
    for r in results.values():
        assert r.keys() >= KEYS
        assert r["eval_loss"] < 5.55  # learned something from ln(256) = 5.545 at init
        assert r["peers"] == 4
    assert results["diloco"]["spread"] < 1e-8  # identical replicas up to summation order
    assert 0 < results["gossip-sparseloco"]["spread"] < 0.01
    ratio = (
        results["gossip-sparseloco"]["bytes_per_peer_per_round"]
        / results["diloco"]["bytes_per_peer_per_round"]
    )
    assert ratio < 0.05
    assert results["gossip-sparseloco"]["bits_per_param"] < 1.0
    decode = results["compressed-noloco"]["decode"]
    assert decode.keys() >= {"wrap_rate", "flagged_rate", "missed_wrap_rate", "error_signal"}
    assert decode["missed_wrap_rate"] <= decode["wrap_rate"] and 0 < decode["error_signal"] < 1
    assert results["diloco"]["decode"] is None
    # The bench picks among the compositions the daemon can run: V-A gossip needs relays.
    assert pick_at(results) == "compressed-noloco"


def test_methods_name_the_default_and_variants_and_always_include_diloco_and_the_default():
    assert parse_spec("default").label == DEFAULT_METHOD
    variant = parse_spec("compressed-noloco:lattice_bits=4:lattice_range=6")
    assert variant.method == "compressed-noloco" and variant.overrides == {
        "lattice_bits": 4,
        "lattice_range": 6,
    }
    labels = [s.label for s in method_specs("noloco,default", ())]
    assert labels == ["diloco", DEFAULT_METHOD, "noloco"]
    for bad in ("nope", "compressed-noloco:bits=4", "noloco:lr"):
        with pytest.raises(SystemExit):
            parse_spec(bad)


def test_the_pick_across_r_must_hold_within_1_percent_of_diloco_at_every_r():
    def row(loss: float, size: float) -> dict:
        return {"eval_loss": loss, "bytes_per_peer_per_round": size}

    by_peers = {
        4: {
            "diloco": row(2.0, 100),
            "compressed-noloco": row(1.95, 10),
            "compressed-noloco:x=1": row(1.9, 12),
        },
        16: {
            "diloco": row(2.0, 100),
            "compressed-noloco": row(2.03, 10),
            "compressed-noloco:x=1": row(2.01, 12),
        },
    }
    assert pick_across(by_peers) == "compressed-noloco:x=1"  # the cheaper one is 1.5 % worse at R = 16
    by_peers[16]["compressed-noloco:x=1"] = row(2.05, 12)
    assert pick_across(by_peers) is None


def test_a_refused_partner_message_skips_the_pair_instead_of_aborting_the_run():
    config = OuterConfig.tuned("compressed-noloco")
    torch.manual_seed(0)
    init = {"w": 0.05 * torch.randn(64, 8)}
    states = [OuterState.fresh(str(i), init) for i in range(4)]
    moves = [0.01, 0.01, 1.0, 0.01]  # peer 2 claims a step 100x its partner's: peer 3 refuses it (P17)
    fast = [{"w": s.slow["w"] + moves[i] * torch.randn(64, 8)} for i, s in enumerate(states)]
    messages = [make_message(config, s, f) for s, f in zip(states, fast, strict=True)]
    alone = [OuterState.fresh(str(i), init) for i in (2, 3)]
    for state, i in zip(alone, (2, 3), strict=True):
        outer_step(config, state, messages[i], [])
    skipped = exchange_pairs(config, states, messages, [1, 0, 3, 2])
    assert skipped == 1
    assert all(s.round == 1 for s in states)
    for state, reference in zip(states[2:], alone, strict=True):  # both partners stepped alone
        assert torch.equal(state.slow["w"], reference.slow["w"])
        assert state.counters == {}
    assert states[0].counters["lattice_values"] == 64 * 8  # the other pair swapped


def test_the_cache_key_is_the_config_the_resolved_settings_and_the_data():
    cfg = sim_config("smoke", 0)
    tuned = OuterConfig.tuned(DEFAULT_METHOD)
    keys = {
        cache.run_key(cfg, DEFAULT_METHOD, tuned, "data"),
        cache.run_key(cfg, DEFAULT_METHOD, OuterConfig.tuned(DEFAULT_METHOD, lattice_bits=7), "data"),
        cache.run_key(sim_config("smoke", 0, peers=8), DEFAULT_METHOD, tuned, "data"),
        cache.run_key(sim_config("smoke", 1), DEFAULT_METHOD, tuned, "data"),
        cache.run_key(cfg, "diloco", OuterConfig.tuned("diloco"), "data"),
        cache.run_key(cfg, "diloco", OuterConfig.tuned("diloco"), "other tokens"),
        cache.run_key(cfg, "ddp", None, "data"),
    }
    assert len(keys) == 7
    # `default` and a variant that spells out the default's settings are one run.
    assert run_key("smoke", 0, DEFAULT_METHOD, None, None) == run_key(
        "smoke", 0, DEFAULT_METHOD, {"lattice_bits": tuned.lattice_bits}, None
    )
    assert len(cache.code_version()) == 16


def test_a_run_without_diloco_or_the_default_exits_non_zero(capsys):
    # A zero budget stops every run at its first evaluation: nothing to compare, so the exit code says so.
    assert main(["--smoke", "--methods", "noloco", "--budget", "0", "--no-cache", "--jobs", "1"]) == 1
    assert "no result for diloco at R = 4" in capsys.readouterr().err


def test_the_modules_left_out_of_the_code_version_are_not_imported_by_a_run():
    # The cache's code version skips the guard's modules; a run that imported one would reuse stale results.
    script = (
        "import sys, bench.convergence.__main__, bench.convergence.jobs\n"
        "print('\\n'.join(getattr(m, '__file__', None) or '' for m in list(sys.modules.values())))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=cache.ROOT
    ).stdout
    for name in cache.NOT_RUN:
        assert name not in loaded, f"{name} is imported by a simulated run but left out of the code version"


def test_an_overlapped_round_settles_to_the_exchange_it_stands_for():
    """`default:overlap=true`: each replica trains on from its own step; once settled, φ is what the plain
    exchange gives, and the replicas' fast weights moved by exactly the difference."""
    cfg = sim_config("smoke", 0)
    init = initial_weights(cfg)
    outer = replace(OuterConfig.tuned(DEFAULT_METHOD), n_peers=cfg.replicas, overlap=True)
    plain = [OuterState.fresh(f"{i:08d}", init) for i in range(cfg.replicas)]
    over = [OuterState.fresh(f"{i:08d}", init) for i in range(cfg.replicas)]
    torch.manual_seed(0)
    fast = [{k: v + 1e-3 * torch.randn_like(v) for k, v in init.items()} for _ in range(cfg.replicas)]
    messages = [make_message(outer, s, f) for s, f in zip(plain, fast, strict=True)]
    partners = [partner_index(cfg.replicas, i, 0, cfg.seed) for i in range(cfg.replicas)]
    exchange_pairs(outer, plain, messages, partners)
    reps = Replicas(cfg, init, cfg.replicas)
    pending = step_alone(outer, over, messages, partners)
    alone = [dict(s.slow) for s in over]
    before = {k: p.detach().clone() for k, p in reps.params.items()}
    assert settle(outer, reps, over, pending) == 0
    for i in range(cfg.replicas):
        for name in init:
            assert torch.equal(over[i].slow[name], plain[i].slow[name])
            moved = reps.params[name].detach()[i] - before[name][i]
            assert torch.allclose(moved, plain[i].slow[name] - alone[i][name], atol=1e-7)
