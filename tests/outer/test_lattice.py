"""V-C's lattice code (docs/outer-methods.md, V-C compressed NoLoCo): a window symmetric around the side
information, subtractive dither, and block checks that find wrapped values so that they are not applied."""

import math

import msgpack
import pytest
import torch

from shoal.gossip.outer import compressed_noloco, quant
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.methods import OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.noloco import noloco_step_from_fast
from shoal.gossip.outer.wire import CHECK_BLOCK, check_bytes, unpack
from shoal.gossip.rounds import payload

BITS = 3  # window ±4 steps


def decode(x: torch.Tensor, side: torch.Tensor, step: float, dither: torch.Tensor | None) -> torch.Tensor:
    codes = quant.lattice_encode(x, step, BITS, dither)
    return quant.lattice_decode(codes, step, side, BITS, dither)


@pytest.mark.parametrize("dithered", [False, True])
def test_the_window_is_symmetric_around_the_side_information(dithered):
    step = 0.01
    # Side information at every offset from the lattice (the old decode rounded it first: +3.25 steps
    # wrapped a quarter of the time, -4 steps never).
    side = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64).float()
    dither = quant.lattice_dither(side.numel(), step, seed=3) if dithered else None
    for offset in (3.4, -3.4, 3.45, -3.45, 0.0, 1.7, -1.7):
        x = side + offset * step
        assert float((decode(x, side, step, dither) - x).abs().max()) <= step / 2 + 1e-6, offset
    # Beyond the window (4 steps, plus half a step of rounding) every value wraps, on both sides alike.
    for offset in (4.6, -4.6):
        x = side + offset * step
        assert bool(((decode(x, side, step, dither) - x).abs() > 3 * step).all()), offset


def test_the_window_is_where_the_decoded_value_lies_within_half_the_modulus_of_the_side():
    step = 0.02
    g = torch.Generator().manual_seed(1)
    side = torch.randn(50000, generator=g)
    x = side + (torch.rand(50000, generator=g) - 0.5) * 10 * step  # up to ±5 steps away
    dither = quant.lattice_dither(x.numel(), step, seed=11)
    k = quant.lattice_indices(x, step, dither)
    exact = quant.lattice_values(k, step, dither).float()
    inside = (exact - side).abs() < (2 ** (BITS - 1) - 1e-3) * step
    outside = (exact - side).abs() > (2 ** (BITS - 1) + 1e-3) * step
    got = decode(x, side, step, dither)
    assert bool((got == exact)[inside].all())
    assert bool((got != exact)[outside].all())
    assert 0.1 < float(inside.float().mean()) < 0.9


def test_dither_makes_the_error_uniform_and_independent_of_the_value():
    step = 0.01
    n = 40000
    # Every value at the same offset from the lattice: undithered rounding repeats one error everywhere.
    for seed, frac in enumerate((0.0, 0.3, -0.45)):
        x = ((torch.arange(n, dtype=torch.float64) - n / 2 + frac) * step).float()
        plain = (decode(x, x, step, None).double() - x.double()) / step
        assert float(plain.std()) < 0.01 and abs(float(plain.mean()) + frac) < 0.02
        dither = quant.lattice_dither(n, step, seed=seed)
        err = (decode(x, x, step, dither).double() - x.double()) / step
        assert float(err.abs().max()) <= 0.5 + 2e-3  # float32 values
        assert abs(float(err.mean())) < 0.01  # unbiased whatever the offset
        assert abs(float(err.std()) - 1 / math.sqrt(12)) < 0.01  # uniform on [-1/2, 1/2]
    # Uncorrelated with the value's position between lattice points.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    dither = quant.lattice_dither(n, step, seed=99)
    err = (decode(x.float(), x.float(), step, dither).double() - x.float().double()) / step
    position = torch.remainder(x / step, 1.0) - 0.5
    assert abs(float(torch.corrcoef(torch.stack([err, position]))[0, 1])) < 0.02


def test_both_sides_draw_the_same_dither_from_the_same_seed():
    a = quant.lattice_dither(1000, 0.5, seed=compressed_noloco.dither_seed("peer-a", 7, 2))
    b = quant.lattice_dither(1000, 0.5, seed=compressed_noloco.dither_seed("peer-a", 7, 2))
    c = quant.lattice_dither(1000, 0.5, seed=compressed_noloco.dither_seed("peer-a", 8, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -0.25 and float(a.max()) < 0.25


def test_a_planted_wrap_is_found_in_its_block_only():
    step = 0.01
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3 * CHECK_BLOCK + 17, generator=g)
    dither = quant.lattice_dither(x.numel(), step, seed=1)
    k = quant.lattice_indices(x, step, dither)
    checks = quant.block_checks(k)
    assert len(checks) == check_bytes(x.numel()) == 2 * 4
    codes = torch.remainder(k, 2**BITS).to(torch.uint8)
    side = x + 0.5 * step * (torch.rand(x.numel(), generator=g) - 0.5)
    assert not bool(
        quant.wrapped_blocks(quant.lattice_decode_indices(codes, step, side, BITS, dither), checks).any()
    )
    for where in ([5], [CHECK_BLOCK + 1, CHECK_BLOCK + 200], [3 * CHECK_BLOCK + 16]):
        far = side.clone()
        far[where] -= 6 * step  # out of the window: these values wrap
        got = quant.lattice_decode_indices(codes, step, far, BITS, dither)
        assert bool((got != k)[where].all())
        flagged = quant.wrapped_blocks(got, checks)
        assert flagged.tolist() == [i in {w // CHECK_BLOCK for w in where} for i in range(4)]


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": 0.05 * torch.randn(40, 32, generator=g), "b": 0.05 * torch.randn(32, generator=g)}


def step_size(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in weights(0).items()}


def test_two_partners_messages_round_trip_and_step_as_noloco_on_the_decoded_values():
    config = OuterConfig.tuned("compressed-noloco", lattice_bits=BITS)
    base = weights(0)
    a = OuterState.fresh("peer-a", base)
    b = OuterState.fresh("peer-b", {k: v + 0.2 * step_size(1)[k] for k, v in base.items()})  # replicas differ
    fa = {k: v - step_size(2)[k] for k, v in a.slow.items()}
    fb = {k: v - step_size(3)[k] for k, v in b.slow.items()}
    ma, mb = make_message(config, a, fa), make_message(config, b, fb)
    for msg, receiver, truth in ((ma, b, fa), (mb, a, fb), (ma, a, fa), (mb, b, fb)):
        message = unpack(msg, config.method)
        decoded = compressed_noloco.read_lattice(message, receiver.slow, config)
        for n, (step, name) in enumerate(zip(message.steps, sorted(truth), strict=True)):
            assert name == sorted(truth)[n]
            assert not bool(decoded.wrapped[name].any())
            assert float((decoded.values[name] - truth[name]).abs().max()) <= step / 2 * (1 + 1e-5)
    # The step is NoLoCo's β = γ step on the decoded θ's, own and partner's.
    own = compressed_noloco.read_lattice(unpack(ma, config.method), a.slow, config).values
    other = compressed_noloco.read_lattice(unpack(mb, config.method), a.slow, config).values
    expected, _ = noloco_step_from_fast(a.slow, own, a.momentum, other, config.momentum, config.lr)
    outer_step(config, a, ma, [mb])
    outer_step(config, b, mb, [ma])
    for k in expected:
        assert torch.equal(a.slow[k], expected[k])
    assert a.counters == {"lattice_values": 40 * 32 + 32, "lattice_wrapped": 0}


def test_a_wrapped_block_is_not_applied_and_is_counted():
    config = OuterConfig.tuned("compressed-noloco", lattice_bits=BITS, lattice_range=3.0)
    base = weights(0)
    a = OuterState.fresh("peer-a", base)
    b = OuterState.fresh("peer-b", {k: v.clone() for k, v in base.items()})
    fa = {k: v - step_size(2)[k] for k, v in a.slow.items()}
    fb = {k: v - step_size(3)[k] for k, v in b.slow.items()}
    # b's replica drifted far away in one value of w: a cannot decode b's θ there.
    b.slow["w"][3, 7] += 1.0
    fb["w"][3, 7] += 1.0
    ma, mb = make_message(config, a, fa), make_message(config, b, fb)
    decoded = compressed_noloco.read_lattice(unpack(mb, config.method), a.slow, config)
    flat = decoded.wrapped["w"].reshape(-1)
    block = (3 * 32 + 7) // CHECK_BLOCK
    assert flat.tolist() == [i // CHECK_BLOCK == block for i in range(flat.numel())]
    assert not bool(decoded.wrapped["b"].any())

    own = compressed_noloco.read_lattice(unpack(ma, config.method), a.slow, config).values
    alone, _ = noloco_step_from_fast(a.slow, own, a.momentum, None, config.momentum, config.lr)
    paired, _ = noloco_step_from_fast(a.slow, own, a.momentum, decoded.values, config.momentum, config.lr)
    outer_step(config, a, ma, [mb])
    got = a.slow["w"].reshape(-1)
    mask = flat
    assert torch.equal(got[mask], alone["w"].reshape(-1)[mask])  # no pull in the wrapped block
    assert torch.equal(got[~mask], paired["w"].reshape(-1)[~mask])  # the rest pulled as usual
    assert torch.equal(a.slow["b"], paired["b"])
    assert a.counters["lattice_wrapped"] == CHECK_BLOCK
    # The distance that did not fit widens the next step when lattice_drift is on.
    assert a.drift["w"] >= 2 ** (BITS - 1) * unpack(mb, config.method).steps[1]


def test_the_drift_term_widens_the_step_to_the_measured_replica_distance():
    plain = OuterConfig.tuned("compressed-noloco", lattice_bits=BITS, lattice_drift=0.0)
    wide = OuterConfig.tuned("compressed-noloco", lattice_bits=BITS, lattice_drift=1.5)
    state = OuterState.fresh("peer-a", weights(0))
    fast = {k: v - step_size(2)[k] for k, v in state.slow.items()}
    narrow_steps = unpack(make_message(plain, state, fast), "compressed-noloco").steps
    assert unpack(make_message(wide, state, fast), "compressed-noloco").steps == narrow_steps  # nothing seen
    state.drift = {"b": 1.0, "w": 0.0}
    steps = unpack(make_message(wide, state, fast), "compressed-noloco").steps
    assert steps[0] == pytest.approx(2 * 1.5 * 1.0 / 2**BITS)  # b: sorted first
    assert steps[1] == narrow_steps[1]


def test_messages_without_or_with_bad_block_checks_are_refused_by_worker_and_daemon():
    config = OuterConfig.tuned("compressed-noloco")
    me, other = OuterState.fresh("me", weights(0)), OuterState.fresh("other", weights(0))
    fast = {k: v + 0.01 for k, v in me.slow.items()}
    own = make_message(config, me, fast)
    good = make_message(config, other, fast)
    body = msgpack.unpackb(good, raw=False)
    spec = sorted((n, tuple(t.shape)) for n, t in me.slow.items())
    payload.check_message(good, "compressed-noloco", spec, config.lattice_bits)
    short = msgpack.packb({**body, "h": [h[:-2] for h in body["h"]]})
    missing = msgpack.packb({k: v for k, v in body.items() if k != "h"})
    for bad in (short, missing, msgpack.packb({**body, "h": body["h"][:1]})):
        with pytest.raises(OuterMessageError):
            outer_step(config, me, own, [bad])
        assert me.round == 0
    for bad in (short, msgpack.packb({**body, "h": body["h"][:1]})):
        with pytest.raises(payload.PayloadError, match="block checks"):
            payload.check_message(bad, "compressed-noloco", spec, config.lattice_bits)
    outer_step(config, me, own, [good])
    assert me.round == 1
