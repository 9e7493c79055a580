"""Hostile payloads: every malformed input is one CodecError, raised before large allocations."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.kernels.codec import CodecConfig, CodecError, decode, encode, expected_of

MODEL = {
    "w": torch.randn(128, 192, generator=torch.Generator().manual_seed(0)),
    "b": torch.randn(67, generator=torch.Generator().manual_seed(1)),
}
EXPECTED = expected_of(MODEL)


def _payload(coding: str = "auto", quantize: bool = True) -> bytes:
    return encode(MODEL, {}, CodecConfig(index_coding=coding, quantize=quantize))


def _split(payload: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack_from("<I", payload, 4)
    return msgpack.unpackb(payload[8 : 8 + header_len]), payload[8 + header_len :]


def _join(header: dict, body: bytes, magic: bytes = b"SHLC") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return magic + struct.pack("<I", len(packed)) + packed + body


def _edit(edit: Callable[[dict], None], coding: str = "auto", quantize: bool = True) -> bytes:
    header, body = _split(_payload(coding, quantize))
    edit(header)
    return _join(header, body)


def _set_entry(field: int, value: object, tensor: int = 0) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header["tensors"][tensor][field] = value

    return edit


def test_valid_payload_decodes() -> None:
    for coding in ("fixed12", "entropy"):
        assert set(decode(_payload(coding), EXPECTED)) == {"w", "b"}


@pytest.mark.parametrize("coding", ["fixed12", "entropy"])
def test_every_truncation_is_rejected(coding: str) -> None:
    payload = _payload(coding)
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut], EXPECTED)


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(CodecError, match="body is"):
        decode(_payload() + b"\0", EXPECTED)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (lambda: b"XXXX" + _payload()[4:], "magic"),
        (lambda: _payload()[:4] + struct.pack("<I", 2**32 - 1) + _payload()[8:], "header length"),
        (lambda: _edit(lambda h: h.update(v=2)), "version"),
        (lambda: _edit(lambda h: h.update(v="1")), "version"),
        (lambda: _edit(lambda h: h.update(chunk=65)), "chunk"),
        (lambda: _edit(lambda h: h.update(chunk=0)), "chunk"),
        (lambda: _edit(lambda h: h.update(topk=10**9)), "topk"),
        (lambda: _edit(lambda h: h.update(topk=32)), r"body is|unary"),  # fewer kept than the body holds
        (lambda: _edit(lambda h: h.update(bins=8)), "bins"),
        (lambda: _edit(lambda h: h.pop("tensors")), "tensor list"),
        (lambda: _edit(lambda h: h["tensors"].pop()), "missing"),
        (lambda: _edit(lambda h: h["tensors"].append(h["tensors"][0])), r"twice|msgpack"),
        (lambda: _edit(_set_entry(0, "v")), "not in the model"),
        (lambda: _edit(_set_entry(1, [192, 128])), "shape"),
        (lambda: _edit(_set_entry(1, [128, 192, 1])), "shape"),
        (lambda: _edit(_set_entry(2, "float16")), "dtype"),
        (lambda: _edit(_set_entry(2, "complex64")), "dtype"),
        (lambda: _edit(_set_entry(3, 7)), "coding"),
        (lambda: _edit(_set_entry(4, 99)), "Rice"),
        (lambda: _edit(_set_entry(5, 2)), "quantized"),
        (lambda: _edit(_set_entry(6, b"\0" * 19)), "side"),
        (lambda: _edit(_set_entry(7, 2**62), coding="entropy"), "unary"),
        (lambda: _edit(_set_entry(7, -1), coding="entropy"), "unary"),
        (lambda: _edit(lambda h: h["tensors"].__setitem__(0, ["w"])), "element list"),
        (lambda: _edit(_set_entry(8, [[], [1, 0, 0, 0]]), coding="fixed12"), "body is"),
        (lambda: _edit(_set_entry(8, [[0, 0, 0, 0]]), coding="entropy"), "bit-plane"),
        (lambda: _edit(_set_entry(8, [[], [2, 0, 0, 0]]), coding="entropy"), "bit-plane"),
        (lambda: _edit(_set_entry(8, [[], [1, 99, 0, 0]]), coding="entropy"), "bit-plane"),
        (lambda: _edit(_set_entry(8, [[], [1, 0, 10**9, 0]]), coding="entropy"), "bit-plane"),
        (lambda: _edit(_set_entry(8, [[], [1, 0, 1, 2**40]]), coding="entropy"), "bit-plane"),
        (lambda: _edit(_set_entry(8, [[], [1, 0, 0, 0]]), quantize=False), "bit-plane"),
        (lambda: _edit(lambda h: h.update(tensors=[[1] * 8] * 5000)), r"header length|msgpack"),
        (lambda: _join([1, 2, 3], b""), "not a map"),  # type: ignore[arg-type]
        (lambda: b"SHLC" + struct.pack("<I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "msgpack"),
        (lambda: b"SHLC" + struct.pack("<I", 64) + b"\x91" * 64, "msgpack"),  # deep nesting
        (lambda: b"SHLC" + struct.pack("<I", 5) + b"\xdd\xff\xff\xff\xff", "msgpack"),  # 4G-entry array
    ],
)
def test_lying_headers_are_rejected(payload: Callable[[], bytes], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(payload(), EXPECTED)


def _side(shift: float, lut: list[float]) -> bytes:
    return np.array([shift, *lut], "<f4").tobytes()


@pytest.mark.parametrize(
    "side",
    [
        _side(float("nan"), [0, 0, 0, 0]),
        _side(0, [1, float("inf"), 1, 1]),
        _side(3e38, [3e38, 3e38, 3e38, 3e38]),  # finite parts, overflowing sum
    ],
)
def test_non_finite_codebooks_are_rejected(side: bytes) -> None:
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode(_edit(_set_entry(6, side)), EXPECTED)


def test_non_finite_raw_values_are_rejected() -> None:
    header, body = _split(_payload("fixed12", quantize=False))
    # The value section of the last tensor ("b", 67 = prime: 67 one-entry tiles) ends the body in fp32.
    bad = body[:-4] + np.array([np.nan], "<f4").tobytes()
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode(_join(header, bad), EXPECTED)


def test_fixed12_indices_beyond_the_tile_are_rejected() -> None:
    header, body = _split(_payload("fixed12"))
    # "w" is first: 6 tiles of 64x64, k = 64; its first 3 bytes hold its first two positions.
    bad = bytes([0xFF, 0xFF, 0xFF]) + body[3:]
    with pytest.raises(CodecError, match=r"strictly increasing|beyond"):
        decode(_join(header, bad), EXPECTED)


def test_fixed12_repeated_indices_are_rejected() -> None:
    header, body = _split(_payload("fixed12"))
    bad = bytes([0x00, 0x10, 0x01]) + body[3:]  # positions 1 and 1
    with pytest.raises(CodecError, match="strictly increasing"):
        decode(_join(header, bad), EXPECTED)


def test_rice_stream_that_overruns_the_tile_is_rejected() -> None:
    header, body = _split(_payload("entropy"))
    assert header["tensors"][0][3] == 1
    unary_len = header["tensors"][0][7]
    # A unary stream of long zero runs and one 1: the gaps overrun the tile or codes are missing.
    bad = b"\x00" * (unary_len - 1) + b"\x01" + body[unary_len:]
    with pytest.raises(CodecError, match=r"unary|beyond"):
        decode(_join(header, bad), EXPECTED)


def test_plane_exceptions_beyond_the_tensor_are_rejected() -> None:
    header, body = _split(_payload("entropy"))
    planes = header["tensors"][0][8]
    assert planes is not None and planes[1] == [1, 0, 0, 0]  # Gaussian deltas: the low plane is all ones
    # Claim one exception at gap 2**20 (Rice r = 20, unary "1", low bits 0): far beyond the 384 values.
    header["tensors"][0][8] = [[], [1, 20, 1, 1]]
    index_len = header["tensors"][0][7] + (384 * header["tensors"][0][4] + 7) // 8
    hi_len = (384 + 7) // 8
    bad = body[: index_len + hi_len] + b"\x80" + b"\xff\xff\xf0" + body[index_len + hi_len :]
    with pytest.raises(CodecError, match="bit plane"):
        decode(_join(header, bad), EXPECTED)


def test_shape_of_the_model_is_what_counts() -> None:
    with pytest.raises(CodecError, match="shape"):
        decode(_payload(), {"w": ((128, 191), torch.float32), "b": ((67,), torch.float32)})


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_corruption_raises_codec_error_or_decodes_in_bounds(data: st.DataObject) -> None:
    payload = bytearray(_payload(data.draw(st.sampled_from(["fixed12", "entropy"]))))
    for _ in range(data.draw(st.integers(1, 8))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        update = decode(bytes(payload), EXPECTED)
    except CodecError:
        return
    for name, sparse in update.items():
        assert sparse.indices.min() >= 0 and sparse.indices.max() < MODEL[name].numel()
        assert bool(torch.isfinite(sparse.values).all())


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=600))
def test_random_bytes_raise_codec_error(blob: bytes) -> None:
    with pytest.raises(CodecError):
        decode(b"SHLC" + struct.pack("<I", len(blob)) + blob, EXPECTED)


def test_hostile_lengths_do_not_allocate() -> None:
    """Declared sizes far beyond the model fail before any buffer of that size exists."""
    big_unary = _edit(_set_entry(7, 2**40), coding="entropy")
    big_header = b"SHLC" + struct.pack("<I", 2**31) + b"\0" * 64
    bomb = b"SHLC" + struct.pack("<I", 6) + b"\xc6\x7f\xff\xff\xff\x00"  # bin of 2 GiB declared
    tracemalloc.start()
    try:
        for payload in (big_unary, big_header, bomb):
            with pytest.raises(CodecError):
                decode(payload, EXPECTED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_all_ones_unary_stream_is_rejected_within_the_model_size() -> None:
    header, body = _split(_payload("entropy"))
    entry = header["tensors"][0]
    n, numel = 6 * 64, 128 * 192  # "w": 2 x 3 tiles of 64 x 64, 64 kept in each
    old_index_len = entry[7] + (n * entry[4] + 7) // 8
    longest = (n + numel + 7) // 8  # the largest unary stream the parser accepts for r = 0
    entry[4], entry[7] = 0, longest
    payload = _join(header, b"\xff" * longest + body[old_index_len:])
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="unary"):
            decode(payload, EXPECTED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * numel  # less than the model tensor's own fp32 bytes
