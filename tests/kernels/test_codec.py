"""Codec behaviour: round trips, error feedback, sizes, the tie rule, shapes of every kind."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.kernels.chunking import layout
from shoal.kernels.codec import CodecConfig, accumulate, decode, encode, expected_of, payload_bits_per_param
from shoal.kernels.packing import packed2_len, packed12_len

EXACT = CodecConfig(topk_per_tile=4096, quantize=False)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(320, 128, generator=g),
        "attn.w": torch.randn(128, 384, generator=g),
        "norm": torch.randn(128, generator=g),
        "prime": torch.randn(101, generator=g),
        "conv": torch.randn(6, 5, 3, 3, generator=g),
        "scalar": torch.randn((), generator=g),
    }


def _header_len(payload: bytes) -> int:
    return struct.unpack_from("<I", payload, 4)[0]


@pytest.mark.parametrize("coding", ["fixed12", "entropy", "auto"])
def test_round_trip_sends_what_left_the_error_feedback(coding: str) -> None:
    deltas = _model()
    ef: dict[str, torch.Tensor] = {}
    payload = encode(deltas, ef, CodecConfig(index_coding=coding), beta=0.95)
    update = decode(payload, expected_of(deltas))
    assert set(update) == set(deltas)
    for name, delta in deltas.items():
        # First round from zero EF: e = delta; after sending, e + sent == delta.
        torch.testing.assert_close(update[name].dense() + ef[name], delta, rtol=0, atol=1e-6)
        lay = layout(tuple(delta.shape), 64, 64)
        assert update[name].indices.numel() == lay.n_kept


def test_full_density_without_quantization_is_exact() -> None:
    deltas = _model(1)
    ef: dict[str, torch.Tensor] = {}
    update = decode(encode(deltas, ef, EXACT, beta=0.95), expected_of(deltas))
    for name, delta in deltas.items():
        assert torch.equal(update[name].dense(), delta)
        assert torch.count_nonzero(ef[name]) == 0


def test_error_feedback_conserves_mass_with_beta_one() -> None:
    """e_T + sum(sent) == sum(delta): nothing is lost, only delayed."""
    cfg = CodecConfig(topk_per_tile=16)
    ef: dict[str, torch.Tensor] = {}
    total_delta = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in _model().items()}
    total_sent = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in _model().items()}
    for step in range(6):
        deltas = _model(10 + step)
        update = decode(encode(deltas, ef, cfg, beta=1.0), expected_of(deltas))
        for name in deltas:
            total_delta[name] += deltas[name].double()
            total_sent[name] += update[name].dense().double()
    for name in total_delta:
        torch.testing.assert_close(ef[name].double() + total_sent[name], total_delta[name], rtol=0, atol=1e-4)


def test_error_feedback_decays_with_beta() -> None:
    deltas = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(3))}
    ef = {"w": torch.ones(64, 64)}
    update = decode(encode(deltas, ef, EXACT, beta=0.5), expected_of(deltas))
    torch.testing.assert_close(update["w"].dense(), 0.5 + deltas["w"], rtol=0, atol=1e-6)


def test_accumulate_adds_scaled_update_without_densifying() -> None:
    deltas = _model(2)
    update = decode(encode(deltas, {}, CodecConfig(), beta=0.95), expected_of(deltas))
    into = {n: torch.full_like(t, 2.0) for n, t in deltas.items()}
    accumulate(update, into, scale=-0.5)
    for name in deltas:
        torch.testing.assert_close(into[name], 2.0 - 0.5 * update[name].dense(), rtol=0, atol=1e-6)


def test_exact_bits_per_parameter_fixed12() -> None:
    deltas = {"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(4))}
    payload = encode(deltas, {}, CodecConfig(index_coding="fixed12"))
    n_kept = 64 * 64  # 64 full tiles, 64 kept each
    body = packed12_len(n_kept) + packed2_len(n_kept)
    assert len(payload) == 8 + _header_len(payload) + body
    header = msgpack.unpackb(payload[8 : 8 + _header_len(payload)])
    assert header["v"] == 1 and header["tensors"][0][3] == 0  # fixed12


def test_bits_per_parameter_meet_the_targets_at_1_56_percent() -> None:
    deltas = {"w": torch.randn(1024, 2048, generator=torch.Generator().manual_seed(5))}
    fixed = payload_bits_per_param(encode(deltas, {}, CodecConfig(index_coding="fixed12")), 1024 * 2048)
    rice = payload_bits_per_param(encode(deltas, {}, CodecConfig(index_coding="entropy")), 1024 * 2048)
    auto = payload_bits_per_param(encode(deltas, {}, CodecConfig(index_coding="auto")), 1024 * 2048)
    assert 0.21875 <= fixed <= 0.22
    assert rice <= 0.15
    assert auto == rice


@pytest.mark.parametrize("dist", ["gaussian", "heavy", "constant", "two-level"])
def test_value_bit_planes_round_trip_for_any_code_distribution(dist: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = {
        "gaussian": torch.randn(256, 256, generator=g),
        "heavy": torch.randn(256, 256, generator=g) ** 5,
        "constant": torch.full((256, 256), 0.25),
        "two-level": torch.randint(0, 2, (256, 256), generator=g).float() * 2 - 1,
    }[dist]
    ef_p: dict[str, torch.Tensor] = {}
    ef_f: dict[str, torch.Tensor] = {}
    planes = encode({"w": x}, ef_p, CodecConfig(index_coding="entropy"))
    packed = encode({"w": x}, ef_f, CodecConfig(index_coding="fixed12"))
    a = decode(planes, expected_of({"w": x}))["w"]
    b = decode(packed, expected_of({"w": x}))["w"]
    # Same selection and codes whatever the coding; only the bytes differ.
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert torch.equal(ef_p["w"], ef_f["w"])
    assert len(planes) < len(packed)


def test_ties_go_to_the_lower_position() -> None:
    # A tile of equal magnitudes (first rounds, unused embedding rows: docs/outer-methods.md, P8) keeps its
    # first k entries.
    x = torch.zeros(64, 64)
    x[10:20] = 1.0
    x[30, 5] = -3.0
    update = decode(encode({"w": x}, {}, CodecConfig(quantize=False)), expected_of({"w": x}))
    kept = update["w"].indices.tolist()
    assert kept == sorted([30 * 64 + 5, *range(10 * 64, 10 * 64 + 63)])


def test_encoding_is_deterministic() -> None:
    deltas = _model(6)
    ef_a: dict[str, torch.Tensor] = {}
    ef_b: dict[str, torch.Tensor] = {}
    assert encode(deltas, ef_a, CodecConfig()) == encode(deltas, ef_b, CodecConfig())


def test_non_finite_delta_is_refused() -> None:
    delta = {"w": torch.zeros(64, 64)}
    delta["w"][3, 3] = float("nan")
    with pytest.raises(Exception, match="NaN or Inf"):
        encode(delta, {}, CodecConfig())


def test_deltas_that_require_grad_are_accepted() -> None:
    delta = torch.randn(64, 64, requires_grad=True)
    update = decode(encode({"w": delta}, {}, EXACT), expected_of({"w": delta}))
    assert torch.equal(update["w"].dense(), delta.detach())


def test_half_precision_deltas_are_accepted() -> None:
    deltas = {"w": torch.randn(64, 128).to(torch.bfloat16)}
    ef: dict[str, torch.Tensor] = {}
    update = decode(encode(deltas, ef, EXACT), expected_of(deltas))
    assert update["w"].dtype == torch.bfloat16
    assert torch.equal(update["w"].dense(), deltas["w"].float())


dims = st.sampled_from([1, 2, 3, 5, 7, 13, 31, 61, 64, 67, 96, 128, 131, 257])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(dims, min_size=0, max_size=3).filter(lambda s: math.prod(s) <= 70_000),
    topk=st.sampled_from([1, 7, 64, 200]),
    coding=st.sampled_from(["fixed12", "entropy", "auto"]),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip_over_shapes(shape: list[int], topk: int, coding: str, seed: int) -> None:
    delta = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    ef: dict[str, torch.Tensor] = {}
    cfg = CodecConfig(topk_per_tile=topk, index_coding=coding)
    update = decode(encode({"t": delta}, ef, cfg), expected_of({"t": delta}))
    sparse = update["t"]
    lay = layout(tuple(shape), 64, topk)
    assert sparse.indices.numel() == lay.n_kept == len(set(sparse.indices.tolist()))
    torch.testing.assert_close(sparse.dense() + ef["t"], delta, rtol=0, atol=1e-5)
    # The kept entries are the largest per tile: nothing left in a tile beats the smallest kept magnitude.
    kept = torch.zeros(delta.numel(), dtype=torch.bool)
    kept[sparse.indices] = True
    flat = delta.reshape(-1).abs()
    tile_of = _tile_ids(tuple(shape), lay)
    for t in range(lay.n_tiles):
        in_tile = tile_of == t
        dropped = flat[in_tile & ~kept]
        if dropped.numel():
            assert flat[in_tile & kept].min() >= dropped.max()


def _tile_ids(shape: tuple[int, ...], lay) -> torch.Tensor:
    r = torch.arange(lay.rows).view(-1, 1) // lay.h
    c = torch.arange(lay.cols).view(1, -1) // lay.w
    return (r * lay.tiles_x + c).reshape(-1)
