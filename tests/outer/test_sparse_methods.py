"""SparseLoCo's codec math and the pairwise composition (V-B pair) with the real codec (kernels.codec).

The all-gather SparseLoCo and the gossip composition (V-A) are research variants: test_research_methods.py.
"""

import pytest
import torch

from shoal.gossip.outer import sparseloco
from shoal.gossip.outer.methods import METHODS, TOPOLOGY, OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.pairing import partner_index
from shoal.kernels.codec import CodecConfig

ATOL = 1e-6


def test_error_feedback_conserves_mass_with_beta_1(tools):
    """e_T + Σ_t sent_t = Σ_t Δ_t: what was not sent stays in the buffer, quantisation error included."""
    model_weights, nudged = tools.model_weights, tools.nudged
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


def test_pairwise_sparse_partners_apply_the_same_update_and_consensus_pulls_them_together(tools):
    model_weights, nudged = tools.model_weights, tools.nudged
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


@pytest.mark.parametrize("method", METHODS)
def test_checkpointed_outer_state_resumes_bit_exactly(tmp_path, tools, method):
    """The product's methods all swap with one partner: drive them with the seeded pairing."""
    assert TOPOLOGY[method] == "pair"

    def run_rounds(config: OuterConfig, states: list[OuterState], rounds: int, start: int) -> None:
        r = len(states)
        for t in range(start, start + rounds):
            msgs = [make_message(config, s, tools.nudged(s.slow, 13 * t + i)) for i, s in enumerate(states)]
            for i, s in enumerate(states):
                p = partner_index(r, i, t)
                outer_step(config, s, msgs[i], [] if p is None else [msgs[p]])

    tools.check_resume(OuterConfig.tuned(method, n_peers=3), run_rounds, tmp_path / "outer.pt")


def test_lattice_consensus_pulls_partners_together_with_fewer_bits(tools):
    model_weights, nudged = tools.model_weights, tools.nudged
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
