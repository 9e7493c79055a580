"""SparseLoCo and the sparse compositions (V-A gossip, V-B pairwise) with the real codec (kernels.codec)."""

import pytest
import torch

from shoal.gossip.outer import sparseloco
from shoal.gossip.outer.methods import OuterConfig, OuterState, known_ids, make_message, outer_step, relay_for
from shoal.gossip.outer.pairing import partner_index
from shoal.kernels.codec import CodecConfig

ATOL = 1e-6
EXACT = CodecConfig(topk_per_tile=64 * 64, quantize=False)  # full density, fp32 values


def model_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": 0.05 * torch.randn(96, 64, generator=g), "b": 0.05 * torch.randn(64, generator=g)}


def nudged(slow: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in slow.items()}


def test_sparseloco_full_density_no_quantisation_beta_0_lr_1_is_fedavg():
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


def test_error_feedback_conserves_mass_with_beta_1():
    """e_T + Σ_t sent_t = Σ_t Δ_t: what was not sent stays in the buffer, quantisation error included."""
    slow = model_weights(1)
    error = {k: torch.zeros_like(v) for k, v in slow.items()}
    total_delta = {k: torch.zeros_like(v) for k, v in slow.items()}
    total_sent = {k: torch.zeros_like(v) for k, v in slow.items()}
    config = CodecConfig()  # the real sparse 2-bit codec
    for t in range(6):
        delta = {k: v - f for (k, v), f in zip(slow.items(), nudged(slow, 100 + t).values(), strict=True)}
        payload, error = sparseloco.compress(delta, error, config, beta=1.0)
        sent, mask = sparseloco.decode_dense(payload, slow)
        for k in slow:
            total_delta[k] += delta[k]
            total_sent[k] += sent[k]
        assert 0 < sum(float(m.sum()) for m in mask.values()) < 0.1 * sum(v.numel() for v in slow.values())
    for k in slow:
        assert torch.allclose(error[k] + total_sent[k], total_delta[k], atol=ATOL, rtol=0)


def test_contributor_mean_divides_by_the_peers_that_sent_each_coordinate():
    values = [{"w": torch.tensor([2.0, 0.0, 4.0])}, {"w": torch.tensor([4.0, 6.0, 0.0])}]
    masks = [{"w": torch.tensor([1.0, 0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}]
    agg = sparseloco.contributor_mean(list(zip(values, masks, strict=True)))
    assert agg["w"].tolist() == [3.0, 6.0, 4.0]


def test_gossip_applies_every_peers_message_exactly_once_at_lr_over_r():
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


def test_pairwise_sparse_partners_apply_the_same_update_and_consensus_pulls_them_together():
    cfg = OuterConfig("pair-sparseloco", lr=1.0, gamma=0.0, consensus_every=1)
    a, b = OuterState.fresh("a", model_weights(3)), OuterState.fresh("b", model_weights(3))
    for t in range(3):
        ma, mb = make_message(cfg, a, nudged(a.slow, t)), make_message(cfg, b, nudged(b.slow, 50 + t))
        outer_step(cfg, a, ma, [mb])
        outer_step(cfg, b, mb, [ma])
    for k in a.slow:  # same start, same pair aggregate: still equal
        assert torch.allclose(a.slow[k], b.slow[k], atol=ATOL, rtol=0)

    pull = OuterConfig("pair-sparseloco", lr=1.0, gamma=0.7, consensus_every=2)
    a, b = OuterState.fresh("a", model_weights(4)), OuterState.fresh("b", model_weights(5))
    gap0 = sum(float((a.slow[k] - b.slow[k]).norm()) for k in a.slow)
    for _ in range(6):
        ma, mb = make_message(pull, a, a.slow), make_message(pull, b, b.slow)
        outer_step(pull, a, ma, [mb])
        outer_step(pull, b, mb, [ma])
    gap = sum(float((a.slow[k] - b.slow[k]).norm()) for k in a.slow)
    assert gap < 0.2 * gap0


def run_rounds(config: OuterConfig, states: list[OuterState], rounds: int, start: int) -> None:
    """Drive `rounds` rounds of peers `states` with each method's topology (all / pair / gossip)."""
    r = len(states)
    for t in range(start, start + rounds):
        msgs = [make_message(config, s, nudged(s.slow, 13 * t + i)) for i, s in enumerate(states)]
        known = [known_ids(s) for s in states]
        received: list[list[bytes]] = [[] for _ in range(r)]
        for i in range(r):
            p = partner_index(r, i, t)
            if config.method == "diloco":
                received[i] = [m for j, m in enumerate(msgs) if j != i]
            elif p is None:
                continue
            elif config.method == "gossip-sparseloco":
                received[p] = relay_for(config, states[i], known[p])
            else:
                received[p] = [msgs[i]]
        for i, s in enumerate(states):
            outer_step(config, s, msgs[i], received[i])


@pytest.mark.parametrize("method", ["gossip-sparseloco", "diloco", "pair-sparseloco", "noloco"])
def test_checkpointed_outer_state_resumes_bit_exactly(tmp_path, method):
    """Save after 2 rounds, load, run 2 more: identical to never stopping (EF, store and round included)."""
    config = OuterConfig.tuned(method, n_peers=3)
    straight = [OuterState.fresh(str(i), model_weights(9)) for i in range(3)]
    run_rounds(config, straight, 4, 0)
    resumed = [OuterState.fresh(str(i), model_weights(9)) for i in range(3)]
    run_rounds(config, resumed, 2, 0)
    path = tmp_path / "outer.pt"
    torch.save([s.state_dict() for s in resumed], path)
    resumed = [OuterState.from_state_dict(d) for d in torch.load(path)]
    run_rounds(config, resumed, 2, 2)
    for a, b in zip(straight, resumed, strict=True):
        assert a.round == b.round == 4 and a.store == b.store
        for k in a.slow:
            assert torch.equal(a.slow[k], b.slow[k]) and torch.equal(a.error[k], b.error[k])
            assert torch.equal(a.momentum[k], b.momentum[k])
    assert any(not torch.equal(a.slow[k], model_weights(9)[k]) for a in straight for k in a.slow)


def test_lattice_consensus_pulls_partners_together_with_fewer_bits():
    pull = OuterConfig(
        "pair-sparseloco", lr=1.0, gamma=0.7, consensus_every=1, consensus_code="lattice", consensus_bits=4
    )
    base = model_weights(6)
    a = OuterState.fresh("a", base)
    b = OuterState.fresh("b", {k: v + 0.003 * torch.randn_like(v) for k, v in base.items()})
    gap0 = sum(float((a.slow[k] - b.slow[k]).norm()) for k in a.slow)
    for t in range(4):
        ma, mb = make_message(pull, a, nudged(a.slow, t)), make_message(pull, b, nudged(b.slow, 20 + t))
        outer_step(pull, a, ma, [mb])
        outer_step(pull, b, mb, [ma])
    gap = sum(float((a.slow[k] - b.slow[k]).norm()) for k in a.slow)
    assert gap < 0.5 * gap0
