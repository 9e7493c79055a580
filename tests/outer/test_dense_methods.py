"""NoLoCo invariances (docs/outer-methods.md, Invariance tests), through the entry point the worker calls.

NoLoCo in fp32 and compressed (V-C); DiLoCo's invariances are in test_research_methods.py.
"""

import torch

from shoal.gossip.outer import noloco
from shoal.gossip.outer.methods import OuterConfig, OuterState, make_message, outer_step

ATOL = 1e-6


def test_noloco_with_two_peers_keeps_them_equal_and_is_heavy_ball_diloco():
    torch.manual_seed(1)
    init = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    config = OuterConfig("noloco", lr=0.7, momentum=0.5)
    a, b = OuterState.fresh("a", init), OuterState.fresh("b", init)
    phi = {k: v.clone() for k, v in init.items()}
    m = {k: torch.zeros_like(v) for k, v in init.items()}
    for _ in range(6):
        fa = {k: v + 0.1 * torch.randn_like(v) for k, v in a.slow.items()}
        fb = {k: v + 0.1 * torch.randn_like(v) for k, v in b.slow.items()}
        ma, mb = make_message(config, a, fa), make_message(config, b, fb)
        outer_step(config, a, ma, [mb])
        outer_step(config, b, mb, [ma])
        # Heavy-ball DiLoCo on the mean pseudo-gradient: m ← μ·m − η·Δ̄; φ ← φ + m.
        mean_delta = {k: phi[k] - (fa[k] + fb[k]) / 2 for k in phi}
        m = {k: 0.5 * m[k] - 0.7 * mean_delta[k] for k in phi}
        phi = {k: phi[k] + m[k] for k in phi}
        for k in init:
            assert torch.allclose(a.slow[k], b.slow[k], atol=ATOL, rtol=0)
            assert torch.allclose(a.slow[k], phi[k], atol=ATOL, rtol=0)


def test_noloco_general_form_equals_fast_weight_form_when_beta_equals_gamma():
    torch.manual_seed(2)
    phi_i, phi_j = {"w": torch.randn(5, 5)}, {"w": torch.randn(5, 5)}
    th_i = {"w": phi_i["w"] + 0.1 * torch.randn(5, 5)}
    th_j = {"w": phi_j["w"] + 0.1 * torch.randn(5, 5)}
    mom = {"w": torch.randn(5, 5)}
    d_i = {"w": phi_i["w"] - th_i["w"]}
    d_j = {"w": phi_j["w"] - th_j["w"]}
    general = noloco.noloco_step(phi_i, d_i, mom, phi_j, d_j, alpha=0.5, beta=0.7, gamma=0.7)
    fast = noloco.noloco_step_from_fast(phi_i, th_i, mom, th_j, alpha=0.5, beta=0.7)
    assert torch.allclose(general[0]["w"], fast[0]["w"], atol=ATOL)
    assert torch.allclose(general[1]["w"], fast[1]["w"], atol=ATOL)


def test_noloco_pulls_two_different_replicas_together():
    torch.manual_seed(3)
    a = OuterState.fresh("a", {"w": torch.randn(50)})
    b = OuterState.fresh("b", {"w": torch.randn(50)})
    config = OuterConfig("noloco", lr=0.7, momentum=0.5)
    gap0 = float((a.slow["w"] - b.slow["w"]).norm())
    for _ in range(10):
        ma, mb = make_message(config, a, a.slow), make_message(config, b, b.slow)  # no local progress
        outer_step(config, a, ma, [mb])
        outer_step(config, b, mb, [ma])
    assert float((a.slow["w"] - b.slow["w"]).norm()) < 0.05 * gap0


def test_compressed_noloco_tracks_fp32_noloco_closely():
    torch.manual_seed(4)
    init = {"w": 0.05 * torch.randn(64, 64)}
    exact_cfg = OuterConfig("noloco", lr=0.7, momentum=0.5)
    lattice_cfg = OuterConfig("compressed-noloco", lr=0.7, momentum=0.5, lattice_bits=8)
    exact = [OuterState.fresh(p, init) for p in "ab"]
    coded = [OuterState.fresh(p, init) for p in "ab"]
    for _ in range(5):
        steps = [{"w": 0.01 * torch.randn(64, 64)} for _ in range(2)]
        for states, cfg in ((exact, exact_cfg), (coded, lattice_cfg)):
            fast = [{"w": s.slow["w"] - d["w"]} for s, d in zip(states, steps, strict=True)]
            msgs = [make_message(cfg, s, f) for s, f in zip(states, fast, strict=True)]
            outer_step(cfg, states[0], msgs[0], [msgs[1]])
            outer_step(cfg, states[1], msgs[1], [msgs[0]])
    err = float((coded[0].slow["w"] - exact[0].slow["w"]).abs().max())
    moved = float((exact[0].slow["w"] - init["w"]).abs().max())
    # The lattice error is ≤ step/2 = 3·max|Δ|/256 per round: a few percent of how far the weights moved.
    assert err < 0.1 * moved
    assert err > 0  # it is a lossy code: this test would not notice if V-C silently sent fp32


def test_a_checkpoint_holding_the_outer_state_is_not_changed_by_later_outer_steps():
    # The worker's background checkpoint holds the outer state's own tensors (state_dict(clone=False)) while
    # the next rounds train and step: every outer step of the dense methods, pulled fully, partly (the
    # guard's clip), or not at all (alone, a refusal), must make new tensors rather than write into them.
    from shoal.gossip.outer.guarded_step import weighted_step

    torch.manual_seed(5)
    for method in ("noloco", "compressed-noloco"):
        config = OuterConfig.tuned(method)
        init = {"w": torch.randn(64, 32), "b": torch.randn(32)}
        a = OuterState.fresh("a", init, error_feedback=False)
        b = OuterState.fresh("b", {k: v + 0.01 * torch.randn_like(v) for k, v in init.items()})
        assert a.error == {}
        held = a.state_dict(clone=False)
        frozen = {part: {k: v.clone() for k, v in held[part].items()} for part in ("slow", "momentum")}
        for weight in (1.0, 0.5, 0.0):
            fa = {k: v + 0.05 * torch.randn_like(v) for k, v in a.slow.items()}
            fb = {k: v + 0.05 * torch.randn_like(v) for k, v in b.slow.items()}
            ma, mb = make_message(config, a, fa), make_message(config, b, fb)
            weighted_step(config, a, ma, mb, weight)
            outer_step(config, b, mb, [ma])
        for part, tensors in frozen.items():
            for k, v in tensors.items():
                assert torch.equal(held[part][k], v), (method, part, k)
        assert not torch.equal(a.slow["w"], frozen["slow"]["w"])  # the state itself moved on
        restored = OuterState.from_state_dict(held)  # a checkpoint without an EF buffer loads
        assert restored.error == {} and restored.round == 0


def test_a_consuming_outer_step_lets_the_old_state_go_as_it_steps(monkeypatch):
    # The worker's outer step lets each tensor's old φ and momentum go once its step is done (`consume`):
    # the same new state, bit for bit, and while the second tensor steps the first one's old φ and momentum
    # are freed already (without `consume` they live until the whole step is over).
    import gc
    import weakref

    from shoal.gossip.outer import compressed_noloco

    torch.manual_seed(6)
    for method, module in (("noloco", noloco), ("compressed-noloco", compressed_noloco)):
        config = OuterConfig.tuned(method)
        init = {"w": torch.randn(64, 32), "b": torch.randn(32)}
        stepped_first = "w" if module is noloco else "b"  # noloco steps in the dict's order, V-C sorted
        plain, consumed = (OuterState.fresh("a", init, error_feedback=False) for _ in range(2))
        partner = OuterState.fresh("b", {k: v + 0.01 * torch.randn_like(v) for k, v in init.items()})
        for _ in range(3):
            fast = {k: v + 0.05 * torch.randn_like(v) for k, v in plain.slow.items()}
            own = make_message(config, plain, fast)
            assert own == make_message(config, consumed, fast)
            theirs = make_message(
                config, partner, {k: v + 0.05 * torch.randn_like(v) for k, v in init.items()}
            )
            alive_at_second_step = {}
            for state, consume in ((plain, False), (consumed, True)):
                first = [weakref.ref(getattr(state, part)[stepped_first]) for part in ("slow", "momentum")]
                steps: list[int] = []
                real = module.ChunkStep

                def counting(
                    *args, steps=steps, first=first, consume=consume, real=real, seen=alive_at_second_step
                ):
                    if len(steps) == 1:  # the second tensor's step begins
                        gc.collect()
                        seen[consume] = sum(ref() is not None for ref in first)
                    steps.append(1)
                    return real(*args)

                monkeypatch.setattr(module, "ChunkStep", counting)
                outer_step(config, state, own, [theirs], consume=consume)
                monkeypatch.setattr(module, "ChunkStep", real)
            assert alive_at_second_step == {False: 2, True: 0}, method
            for part in ("slow", "momentum"):
                for k, v in getattr(plain, part).items():
                    assert torch.equal(getattr(consumed, part)[k], v), (method, part, k)


def test_a_clipped_pull_moves_the_step_alone_that_share_of_the_way_toward_the_full_step():
    # The guard's clip (weight w) applied in one pass must be the step alone moved w of the way toward the
    # step with the partner, for φ and momentum alike; w = 1 is the method's step to the bit, w = 0 alone.
    from shoal.gossip.outer.guarded_step import weighted_step

    torch.manual_seed(8)
    for method in ("noloco", "compressed-noloco"):
        config = OuterConfig.tuned(method)
        init = {"w": torch.randn(300, 70), "b": torch.randn(70)}
        states = {}
        for weight in ("alone", "full", 1.0, 0.3, 0.0):
            a = OuterState.fresh("a", init)
            a.momentum = {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
                          for k, v in init.items()}  # fmt: skip
            b = OuterState.fresh("b", {k: v + 0.01 for k, v in init.items()})
            g = torch.Generator().manual_seed(4)
            fa = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in a.slow.items()}
            fb = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in b.slow.items()}
            ma, mb = make_message(config, a, fa), make_message(config, b, fb)
            if weight == "alone":
                outer_step(config, a, ma, [])
            elif weight == "full":
                outer_step(config, a, ma, [mb])
            else:
                weighted_step(config, a, ma, mb, weight, consume=True)
            states[weight] = a
        for part in ("slow", "momentum"):
            alone, full = getattr(states["alone"], part), getattr(states["full"], part)
            for k in init:
                assert torch.equal(getattr(states[1.0], part)[k], full[k])
                assert torch.equal(getattr(states[0.0], part)[k], alone[k])
                expected = alone[k] + 0.3 * (full[k] - alone[k])
                assert torch.allclose(getattr(states[0.3], part)[k], expected, atol=1e-6), (method, part)
                assert not torch.allclose(expected, full[k], atol=1e-4)  # the clip does move it
