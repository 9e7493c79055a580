"""Entropy coding of sorted per-tile indices: Golomb-Rice codes of the gaps, split into two streams.

Within a tile the kept positions ``p_0 < p_1 < ... < p_{k-1}`` become gaps ``g_0 = p_0`` and
``g_i = p_i - p_{i-1} - 1`` (all >= 0; about geometric with mean L/k - 1 for top-k of noise). Each gap is
Rice-coded with parameter ``r``: quotient ``g >> r`` in unary (that many 0 bits, then a 1), remainder in ``r``
plain bits. We write all unary parts into one stream and all remainders into another (the Elias-Fano split):
the size is that of the Rice code, and both streams decode without a bit-serial loop (the 1 bits of the unary
stream sit at ``cumsum(q + 1) - 1``).

At 64 of 4096 this costs about 7.5 bits per index against 12 for fixed-width indices and an information
bound of log2(C(4096, 64)) / 64 = 7.4 bits (docs/outer-methods.md, P9).
"""

from __future__ import annotations

import numpy as np

from shoal.kernels.packing import pack_bits, packed_bits_len, unpack_bits

# Largest Rice parameter: a gap is < 4096 = 2**12, so r = 12 would already be a fixed-width code.
MAX_RICE = 11


def gaps(positions: np.ndarray) -> np.ndarray:
    """Gaps of sorted positions ``(T, k)`` (int64), row by row, flattened."""
    g = np.diff(positions, axis=1, prepend=-1) - 1
    return g.reshape(-1)


def best_rice_parameter(g: np.ndarray, max_r: int = MAX_RICE) -> int:
    """The r in [0, max_r] that minimises the coded size of gaps ``g``."""
    if g.size == 0:
        return 0
    # The size is convex in r with its minimum near log2(mean gap): try the neighbourhood only.
    guess = int(np.log2(max(1.0, float(g.mean())))) if g.size else 0
    candidates = range(max(0, min(max_r, guess - 2)), min(max_r, guess + 1) + 1)
    return min(candidates, key=lambda r: rice_size_bits(g, r))


def rice_size_bits(g: np.ndarray, r: int) -> int:
    return int((g >> r).sum()) + g.size * (r + 1)


def encode(g: np.ndarray, r: int) -> tuple[bytes, bytes]:
    """(unary stream, remainder stream) for gaps ``g`` with parameter ``r``."""
    q = g >> r
    ones = np.cumsum(q + 1) - 1
    n_bits = int(ones[-1]) + 1 if g.size else 0
    bits = np.zeros(n_bits, np.uint8)
    bits[ones] = 1
    unary = np.packbits(bits).tobytes()
    low = pack_bits(g & ((1 << r) - 1), r)
    return unary, low


def low_len(n: int, r: int) -> int:
    return packed_bits_len(n, r)


def max_unary_len(n: int, total_gap: int, r: int) -> int:
    """Most bytes a valid unary stream can take: n ones plus at most total_gap >> r zeros."""
    return (n + (total_gap >> r) + 7) // 8


def decode(unary: bytes | memoryview, low: bytes | memoryview, n: int, r: int) -> np.ndarray | None:
    """Gaps from the two streams, or None when the unary stream does not hold exactly n codes
    (or has bits set after the last one). Lengths must have been checked by the caller."""
    bits = np.unpackbits(np.frombuffer(unary, np.uint8))
    # Count before listing: a hostile all-ones stream must not make a position array 8x its size.
    if np.count_nonzero(bits) != n:
        return None
    ones = np.flatnonzero(bits)
    q = np.diff(ones, prepend=-1) - 1
    return (q << r) | unpack_bits(low, n, r)


def positions(g: np.ndarray, n_tiles: int, k: int) -> np.ndarray:
    """Sorted positions ``(T, k)`` from gaps (inverse of :func:`gaps`)."""
    return np.cumsum(g.reshape(n_tiles, k) + 1, axis=1) - 1


# ---- bit planes of the 2-bit value codes ----
#
# The 2-bit codes of top-k values are far from uniform: kept values sit in the tails, so for Gaussian-like
# deltas almost all codes are 1 or 3 (about one bit of information, two bits sent). Each bit plane of the
# codes (high bits, low bits) is sent either raw (one bit per value) or, when it is skewed, as its majority
# bit plus the sorted positions of the other bits, Rice-coded like the indices.

# Rice parameter cap for plane exceptions: gaps span a whole tensor (< 2**40 entries accepted).
MAX_PLANE_RICE = 40


def encode_plane(bits: np.ndarray) -> tuple[list[int], bytes]:
    """(descriptor, bytes) of one bit plane: ``[]`` and packed bits, or ``[majority, r, count, unary_len]``
    and the exception positions' Rice streams, whichever is smaller."""
    raw = np.packbits(bits).tobytes()
    majority = int(2 * int(bits.sum()) > bits.size)
    exceptions = np.flatnonzero(bits != majority)
    if exceptions.size == 0:
        return [majority, 0, 0, 0], b""
    g = np.diff(exceptions, prepend=-1) - 1
    r = best_rice_parameter(g, MAX_PLANE_RICE)
    if rice_size_bits(g, r) + 16 >= 8 * len(raw):
        return [], raw
    unary, low = encode(g, r)
    return [majority, r, int(exceptions.size), len(unary)], unary + low


def plane_len(descriptor: list[int], n: int) -> int:
    if not descriptor:
        return (n + 7) // 8
    _, r, count, unary_len = descriptor
    return unary_len + low_len(count, r)


def check_plane(descriptor: object, n: int) -> bool:
    """Whether a plane descriptor from the wire is well-formed for n values (before any allocation)."""
    if descriptor == []:
        return True
    if not isinstance(descriptor, list) or len(descriptor) != 4:
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in descriptor):
        return False
    majority, r, count, unary_len = descriptor
    return (
        majority in (0, 1)
        and 0 <= r <= MAX_PLANE_RICE
        and 0 <= count <= n
        and 0 <= unary_len <= max_unary_len(count, n, r)
    )


def decode_plane(descriptor: list[int], data: bytes | memoryview, n: int) -> np.ndarray | None:
    """The n bits of a plane (uint8), or None if its exception stream is malformed."""
    if not descriptor:
        return np.unpackbits(np.frombuffer(data, np.uint8), count=n)
    majority, r, count, unary_len = descriptor
    bits = np.full(n, majority, np.uint8)
    if count == 0:
        return bits if unary_len == 0 else None
    unary, low = data[:unary_len], data[unary_len:]
    g = decode(unary, low, count, r)
    if g is None or unary[-1] == 0:
        return None
    where = np.cumsum(g + 1) - 1
    if int(where[-1]) >= n:
        return None
    bits[where] = 1 - majority
    return bits
