"""The chunked codes of issue 17 ("Fast codes") against the frozen code they replaced
(bench/outer_reference.py): the same wire bytes for the same inputs and seeds, and the same decoded values
and steps, bit for bit."""

import numpy as np
import pytest
import torch

from bench import outer_reference as ref
from shoal.gossip.outer import quant
from shoal.gossip.outer.config import MODULES, OuterConfig, OuterState
from shoal.gossip.outer.methods import METHODS
from shoal.gossip.outer.wire import unpack

SIZES = (1, 7, 255, 256, 257, 4099, quant.CHUNK + 3)  # odd sizes, one value, whole and partial chunks


def inputs(n: int, seed: int) -> dict[str, tuple[torch.Tensor, float]]:
    """Values and a lattice step: ordinary, all zeros, -0.0, and large against the step (k wraps 2^b, 2^16,
    2^31 and, for 1e30, overflows int64 as the reference's .long() does)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(n, generator=g)
    return {
        "randn": (x, 1e-3),
        "zeros": (torch.zeros(n), 1e-3),
        "negative zeros": (torch.full((n,), -0.0), 1e-3),
        "large": (1e4 * torch.randn(n, generator=g), 1e-5),
        "huge": (torch.full((n,), 1e30) * torch.sign(torch.randn(n, generator=g)), 1e-10),
        "inf": (torch.where(x > 0, torch.inf, x), 1e-3),
    }


def reference_encode(x: torch.Tensor, step: float, bits: int, seed: int | None) -> tuple[bytes, bytes]:
    dither = None if seed is None else ref.lattice_dither(x.numel(), step, seed)
    k = ref.lattice_indices(x, step, dither)
    return ref.pack_codes(torch.remainder(k, 2**bits).to(torch.uint8), bits), ref.block_checks(k)


def decode_all(raw: bytes, step: float, side: torch.Tensor, bits: int, seed: int | None, checks: bytes):
    dither = None if seed is None else quant.Dither(step, seed)
    out = np.empty(side.numel(), np.float32)
    chunks = quant.decode_chunks(raw, step, side.numpy(), bits, dither, checks, out, nan_side=True)
    wrapped = np.concatenate([w for *_, w in chunks])
    return out, wrapped


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_encode_writes_the_reference_bytes(n, bits):
    for i, (what, (x, step)) in enumerate(inputs(n, seed=n + bits).items()):
        for seed in (None, 1000 + i):
            dither = None if seed is None else quant.Dither(step, seed)
            got = quant.encode_packed(x.numpy(), step, bits, dither)
            assert got == reference_encode(x, step, bits, seed), (what, seed)
            # The public per-value code is unchanged too.
            if seed is None:
                assert torch.equal(quant.lattice_encode(x, step, bits), ref.lattice_encode(x, step, bits))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_gives_the_reference_values_and_wrapped_blocks(n, bits):
    g = torch.Generator().manual_seed(n * bits)
    x = 0.05 * torch.randn(n, generator=g)
    step, seed = 1e-3, 77
    raw, checks = reference_encode(x, step, bits, seed)
    dither = ref.lattice_dither(n, step, seed)
    near = x + 0.2 * step * torch.randn(n, generator=g)
    far = x + 2**bits * step * torch.randn(n, generator=g)  # many values out of the window: wraps
    with_nan = near.clone()
    with_nan[n // 2] = torch.nan
    for side in (near, far, torch.zeros(n), with_nan):
        k = ref.lattice_decode_indices(ref.unpack_codes(raw, n, bits), step, side, bits, dither)
        values, wrapped = decode_all(raw, step, side, bits, seed, checks)
        assert torch.equal(torch.from_numpy(values), ref.lattice_values(k, step, dither).float())
        assert torch.equal(torch.from_numpy(wrapped), ref.wrapped_blocks(k, checks))
    assert decode_all(raw, step, far, bits, seed, checks)[1].any() or n < 4
    # Undithered, through the public function that pair-sparseloco's consensus uses.
    codes = quant.lattice_encode(x, step, bits)
    want = ref.lattice_decode(codes, step, far, bits)
    assert torch.equal(quant.lattice_decode(codes, step, far, bits), want)


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (37, 24), "w": (24, 72), "b": (72,), "one": (1,), "scalar": ()}
    shapes["long"] = (quant.CHUNK + 9,)
    return {n: 0.05 * torch.randn(s, generator=g) for n, s in shapes.items()}


def moved(named: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in named.items()}


def states(seed: int) -> tuple[OuterState, OuterState, dict, dict]:
    base = model(seed)
    a = OuterState.fresh("peer-a", base)
    b = OuterState.fresh("peer-b", moved(base, 3e-4, seed + 1))
    a.momentum = moved(a.momentum, 1e-3, seed + 2)  # a later round: δ is not zero
    a.drift = {"w": 1e-3}
    return a, b, moved(a.slow, 1e-3, seed + 3), moved(b.slow, 1e-3, seed + 4)


def run(impl, config: OuterConfig, seed: int, partner: bool, drifted: bool) -> tuple:
    a, b, fast_a, fast_b = states(seed)
    if drifted:  # b's replica is far from a's in a few values: a's decode of b wraps there
        for t in (b.slow, fast_b):
            t["long"].view(-1)[[3, 300, quant.CHUNK + 1]] += 1.0
    own, theirs = impl.make_message(config, a, fast_a), impl.make_message(config, b, fast_b)
    impl.outer_step(config, a, own, [theirs] if partner else [])
    return own, theirs, a


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_the_reference_bytes_and_steps_to_the_same_bits(method):
    config = OuterConfig.tuned(method)
    for seed, partner, drifted in ((0, True, False), (1, False, False), (2, True, True)):
        new_own, new_theirs, new = run(MODULES[method], config, seed, partner, drifted)
        old_own, old_theirs, old = run(ref.REFERENCE[method], config, seed, partner, drifted)
        assert new_own == old_own and new_theirs == old_theirs
        for what in ("slow", "momentum", "error"):
            got, want = getattr(new, what), getattr(old, what)
            assert got.keys() == want.keys()
            for n in got:
                assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), (what, n)
        assert new.drift == old.drift and new.counters == old.counters
        if method == "compressed-noloco" and drifted:
            assert new.counters["lattice_wrapped"] > 0


def test_read_lattice_matches_the_reference_including_wrapped_values():
    config = OuterConfig.tuned("compressed-noloco")
    a, b, _, fast_b = states(5)
    for t in (b.slow, fast_b):
        t["w"].view(-1)[[0, 700]] += 1.0
    message = unpack(MODULES["compressed-noloco"].make_message(config, b, fast_b), config.method)
    got = MODULES["compressed-noloco"].read_lattice(message, a.slow, config)
    want = ref.read_lattice(message, a.slow, config)
    for n in a.slow:
        assert torch.equal(got.values[n], want.values[n]) and torch.equal(got.wrapped[n], want.wrapped[n])
    assert bool(got.wrapped["w"].any())


def test_the_guards_decode_patches_wrapped_blocks_with_our_own_values():
    # read_partner (the guard's decode): read_lattice's values with every wrapped block's values replaced
    # by this peer's own θ, and the fraction that wrapped, without a model-sized mask.
    config = OuterConfig.tuned("compressed-noloco")
    a, b, fast_a, fast_b = states(5)
    for t in (b.slow, fast_b):
        t["w"].view(-1)[[0, 700]] += 1.0
    message = unpack(MODULES["compressed-noloco"].make_message(config, b, fast_b), config.method)
    values, wrapped = MODULES["compressed-noloco"].read_partner(message, a.slow, fast_a, config)
    decoded = ref.read_lattice(message, a.slow, config)
    count = 0
    for n in a.slow:
        mask = decoded.wrapped[n]
        want = torch.where(mask, fast_a[n].float(), decoded.values[n])
        assert torch.equal(values[n], want), n
        count += int(mask.sum())
    assert count > 0 and wrapped == count / sum(t.numel() for t in a.slow.values())
