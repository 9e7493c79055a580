"""The research variants (bench/convergence/research: DiLoCo, all-gather SparseLoCo, V-A gossip).

The daemon refuses them; the convergence benchmark runs them through the same dispatch as the product's
methods once `bench.convergence.research` is imported. Invariances of docs/outer-methods.md, Invariance
tests.
"""

import pytest
import torch

from bench.convergence.research import RESEARCH_METHODS, diloco
from bench.convergence.research.gossip_sparseloco import known_ids, relay_for
from shoal.gossip.outer.methods import METHODS, TOPOLOGY, OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.pairing import partner_index
from shoal.kernels.codec import CodecConfig

ATOL = 1e-6
EXACT = CodecConfig(topk_per_tile=64 * 64, quantize=False)  # full density, fp32 values


def test_research_methods_are_registered_but_not_product_methods():
    for method in RESEARCH_METHODS:
        assert method not in METHODS and TOPOLOGY[method] != "pair"
        assert OuterConfig.tuned(method).method == method


def test_diloco_with_one_worker_one_inner_step_lr_1_no_momentum_is_adamw(tools):
    batches, make_model, train_step, weights, load = (
        tools.batches,
        tools.make_model,
        tools.train_step,
        tools.weights,
        tools.load,
    )
    data = batches(12)
    reference = make_model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for b in data:
        train_step(reference, ref_opt, b)

    worker = make_model()
    opt = torch.optim.AdamW(worker.parameters(), lr=1e-2, weight_decay=0.1)  # persists across rounds
    config = OuterConfig("diloco", lr=1.0, momentum=0.0)
    state = OuterState.fresh("me", weights(worker))
    for b in data:
        train_step(worker, opt, b)
        own = make_message(config, state, weights(worker))
        load(worker, outer_step(config, state, own, []))
    for name, w in weights(reference).items():
        assert torch.allclose(state.slow[name], w, atol=ATOL, rtol=0)
    assert state.round == len(data)


def test_diloco_lr_1_no_momentum_is_fedavg_over_workers(tools):
    batches, make_model, train_step, weights = (
        tools.batches,
        tools.make_model,
        tools.train_step,
        tools.weights,
    )
    init = weights(make_model())
    workers = [make_model() for _ in range(3)]
    opts = [torch.optim.SGD(w.parameters(), lr=0.1) for w in workers]
    config = OuterConfig("diloco", lr=1.0, momentum=0.0)
    states = [OuterState.fresh(str(i), init) for i in range(3)]
    for i, (w, o) in enumerate(zip(workers, opts, strict=True)):
        for b in batches(3, seed=10 + i):
            train_step(w, o, b)
    fast = [weights(w) for w in workers]
    messages = [make_message(config, s, f) for s, f in zip(states, fast, strict=True)]
    for i, s in enumerate(states):
        new = outer_step(config, s, messages[i], [m for j, m in enumerate(messages) if j != i])
        for name in init:
            fedavg = sum(f[name] for f in fast) / 3
            assert torch.allclose(new[name], fedavg, atol=ATOL, rtol=0)


def test_diloco_outer_step_is_torch_nesterov_sgd():
    torch.manual_seed(0)
    phi = {"w": torch.randn(6, 5), "b": torch.randn(5)}
    param = {k: torch.nn.Parameter(v.clone()) for k, v in phi.items()}
    sgd = torch.optim.SGD(param.values(), lr=0.7, momentum=0.9, nesterov=True)
    momentum = {k: torch.zeros_like(v) for k, v in phi.items()}
    for _ in range(5):
        delta = {k: torch.randn_like(v) for k, v in phi.items()}
        phi, momentum = diloco.nesterov_step(phi, delta, momentum, lr=0.7, mu=0.9)
        for k, p in param.items():
            p.grad = delta[k].clone()
        sgd.step()
        for k in phi:
            assert torch.allclose(phi[k], param[k].detach(), atol=ATOL, rtol=0)


def test_sparseloco_full_density_no_quantisation_beta_0_lr_1_is_fedavg(tools):
    model_weights, nudged = tools.model_weights, tools.nudged
    init = model_weights(0)
    config = OuterConfig("sparseloco", lr=1.0, ef_beta=0.0, codec=EXACT)
    states = [OuterState.fresh(str(i), init) for i in range(3)]
    for round_ in range(3):
        fast = [nudged(s.slow, 10 * round_ + i) for i, s in enumerate(states)]
        msgs = [make_message(config, s, f) for s, f in zip(states, fast, strict=True)]
        for i, s in enumerate(states):
            outer_step(config, s, msgs[i], [m for j, m in enumerate(msgs) if j != i])
        for k in init:
            fedavg = sum(f[k] for f in fast) / 3
            for s in states:
                assert torch.allclose(s.slow[k], fedavg, atol=ATOL, rtol=0)


def test_gossip_applies_every_peers_message_exactly_once_at_lr_over_r(tools):
    model_weights, nudged = tools.model_weights, tools.nudged
    init = model_weights(2)
    r, lr = 4, 2.0
    config = OuterConfig("gossip-sparseloco", lr=lr, ef_beta=0.0, codec=EXACT, n_peers=r, gossip_ttl=6)
    states = [OuterState.fresh(str(i), init) for i in range(r)]
    expected = {k: v.clone() for k, v in init.items()}
    for t in range(8):
        active = t < 3  # three rounds of real updates, then quiet rounds that only relay
        fast = [nudged(s.slow, 7 * t + i) if active else s.slow for i, s in enumerate(states)]
        msgs = [make_message(config, s, f) for s, f in zip(states, fast, strict=True)]
        if active:
            for f, old in zip(fast, [s.slow for s in states], strict=True):
                for k in expected:
                    expected[k] -= lr / r * (old[k] - f[k])
        known = [known_ids(s) for s in states]
        received: list[list[bytes]] = [[] for _ in range(r)]
        for i in range(r):
            p = partner_index(r, i, t)
            received[p] = relay_for(config, states[i], known[p])
        for i, s in enumerate(states):
            outer_step(config, s, msgs[i], received[i])
    for k in init:
        for s in states:
            assert torch.allclose(s.slow[k], expected[k], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", RESEARCH_METHODS)
def test_checkpointed_outer_state_resumes_bit_exactly(tmp_path, tools, method):
    """All-to-all methods receive every other peer's message; gossip relays what the partner lacks."""

    def run_rounds(config: OuterConfig, states: list[OuterState], rounds: int, start: int) -> None:
        r = len(states)
        for t in range(start, start + rounds):
            msgs = [make_message(config, s, tools.nudged(s.slow, 13 * t + i)) for i, s in enumerate(states)]
            known = [known_ids(s) for s in states]
            received: list[list[bytes]] = [[] for _ in range(r)]
            for i in range(r):
                p = partner_index(r, i, t)
                if TOPOLOGY[config.method] == "all":
                    received[i] = [m for j, m in enumerate(msgs) if j != i]
                elif p is not None:
                    received[p] = relay_for(config, states[i], known[p])
            for i, s in enumerate(states):
                outer_step(config, s, msgs[i], received[i])

    tools.check_resume(OuterConfig.tuned(method, n_peers=3), run_rounds, tmp_path / "outer.pt")
