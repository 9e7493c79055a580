"""Bit packing of index and value streams (numpy, vectorised). Bit orders are fixed by docs/wire-format.md."""

from __future__ import annotations

import numpy as np


def pack12(values: np.ndarray) -> bytes:
    """12-bit unsigned values, two per 3 bytes, big-endian bit order (``aaaaaaaa aaaabbbb bbbbbbbb``);
    an odd count is padded with a zero value."""
    v = np.asarray(values, dtype=np.uint16)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint16)])
    a, b = v[0::2], v[1::2]
    out = np.empty((a.size, 3), np.uint8)
    out[:, 0] = a >> 4
    out[:, 1] = ((a & 0xF) << 4) | (b >> 8)
    out[:, 2] = b & 0xFF
    return out.tobytes()


def packed12_len(n: int) -> int:
    return 3 * ((n + 1) // 2)


def unpack12(data: bytes | memoryview, n: int) -> np.ndarray:
    """Inverse of :func:`pack12`: ``n`` values (int64) from exactly ``packed12_len(n)`` bytes."""
    raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int64)
    out = np.empty(raw.shape[0] * 2, np.int64)
    out[0::2] = (raw[:, 0] << 4) | (raw[:, 1] >> 4)
    out[1::2] = ((raw[:, 1] & 0xF) << 8) | raw[:, 2]
    return out[:n]


def pack2(codes: np.ndarray) -> bytes:
    """2-bit codes, four per byte, first code in the lowest bits."""
    c = np.asarray(codes, dtype=np.uint8)
    pad = (-c.size) % 4
    if pad:
        c = np.concatenate([c, np.zeros(pad, np.uint8)])
    c = c.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8).tobytes()


def packed2_len(n: int) -> int:
    return (n + 3) // 4


def unpack2(data: bytes | memoryview, n: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    out = np.empty((raw.size, 4), np.uint8)
    for j in range(4):
        out[:, j] = (raw >> (2 * j)) & 3
    return out.reshape(-1)[:n]


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Fixed-width unsigned values (< 2**width, width <= 63), most significant bit first, concatenated and
    zero-padded to a byte."""
    if width == 0 or values.size == 0:
        return b""
    # Big-endian bytes of each value, as bits; keep the low `width` bit columns. All uint8 work.
    container = 8 if width > 32 else 4 if width > 16 else 2 if width > 8 else 1
    raw = np.asarray(values).astype(f">u{container}").view(np.uint8).reshape(-1, container)
    bits = np.unpackbits(raw, axis=1)[:, 8 * container - width :]
    return np.packbits(bits).tobytes()


def packed_bits_len(n: int, width: int) -> int:
    return (n * width + 7) // 8


def unpack_bits(data: bytes | memoryview, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values (int64) from exactly ``packed_bits_len(n, width)`` bytes."""
    if width == 0 or n == 0:
        return np.zeros(n, np.int64)
    raw = np.frombuffer(data, np.uint8)
    if width <= 9:
        # Common case (Rice remainders): each value lies within the two bytes at its bit offset.
        offsets = np.arange(n, dtype=np.int64) * width
        first = offsets >> 3
        padded = np.concatenate([raw, np.zeros(2, np.uint8)])
        word = (padded[first].astype(np.int64) << 8) | padded[first + 1]
        return (word >> (16 - width - (offsets & 7))) & ((1 << width) - 1)
    bits = np.unpackbits(raw, count=n * width).reshape(n, width)
    # Each value's bits, left-aligned in whole bytes, read as one big-endian integer and shifted down.
    packed = np.packbits(bits, axis=1)
    container = 8 if width > 32 else 4 if width > 16 else 2 if width > 8 else 1
    if packed.shape[1] != container:
        packed = np.concatenate([packed, np.zeros((n, container - packed.shape[1]), np.uint8)], axis=1)
    return (packed.view(f">u{container}").reshape(n) >> (8 * container - width)).astype(np.int64)
