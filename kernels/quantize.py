"""The 4-bin statistical quantizer of SparseLoCo (docs/outer-methods.md, P6), made deterministic.

Per tensor, over the kept values ``v`` (tile order, ascending position): ``shift = mean(v)``,
``c = v - shift``,
``scale = 1.5 * std(c)`` (n - 1 in the denominator; 1.0 when that is 0, NaN or Inf, or n < 2), and code
``q = #{j : c >= t_j}`` for the thresholds ``t = (-1.5, -0.5, +0.5) * scale`` (the reference's
``clamp(round(c / scale + 2), 0, 3)``, written as comparisons so that no rounding mode or fused multiply-add
can move a value across a bin edge). The codebook ``lut[b]`` is the mean of the ``c`` that fell in bin ``b``
(0 for an empty bin); a value decodes to ``lut[q] + shift`` in float32.

Every sum is taken in float64 in one fixed order, so that every backend gets the same bits: sequentially
over the k values of each tile, then sequentially over the tiles (``tile_sum`` then ``total``). A GPU
reduction in an order of its own would differ in the last bits, and one ulp of ``scale`` moves values
between bins, which would break the byte-equality of the backends' payloads. The CuPy backend computes the
per-tile partial sums in its kernels and finishes them with the functions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 4
# Quantizer range in standard deviations (reference `range = 6`): scale = RANGE_SIGMA * std / BINS = 1.5 std.
RANGE_SIGMA = 6.0
# Bin edges in units of scale: round(c / scale + 2) changes value at c / scale = -1.5, -0.5, +0.5.
EDGES = np.array([-1.5, -0.5, 0.5], dtype=np.float32)


@dataclass(frozen=True)
class Quantized:
    codes: np.ndarray  # uint8 in [0, BINS), one per kept value
    shift: np.float32
    lut: np.ndarray  # float32, BINS entries

    def side(self) -> bytes:
        """The side information the wire carries: shift, then the codebook, little-endian float32."""
        return np.concatenate([[self.shift], self.lut]).astype("<f4").tobytes()


def tile_sum(x64: np.ndarray) -> np.ndarray:
    """Sequential float64 sums of each row of ``x64`` (T, k), each started from +0.0."""
    return np.cumsum(x64, axis=1)[:, -1] + 0.0


def total(partials: np.ndarray) -> float:
    """Sequential float64 sum of per-tile partials, started from +0.0."""
    return float(np.cumsum(partials)[-1] + 0.0) if partials.size else 0.0


def shift_of(sum_v: float, n: int) -> np.float32:
    return np.float32(sum_v / n)


def thresholds_of(sum_sq: float, n: int) -> np.ndarray:
    """Bin edges (float32) from the sum of squared centred values."""
    std = float(np.sqrt(sum_sq / (n - 1))) if n > 1 else 0.0
    scale = np.float32(RANGE_SIGMA / BINS * std)
    if not np.isfinite(scale) or scale == 0:
        scale = np.float32(1.0)
    return EDGES * scale


def codes_of(c: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    codes = (c >= thresholds[0]).astype(np.uint8)
    codes += c >= thresholds[1]
    codes += c >= thresholds[2]
    return codes


def lut_of(bin_sums: np.ndarray, bin_counts: np.ndarray) -> np.ndarray:
    """Codebook from per-tile per-bin partial sums (T, BINS) float64 and counts (T, BINS)."""
    sums = np.array([total(bin_sums[:, b]) for b in range(BINS)])
    counts = bin_counts.sum(axis=0)
    lut = np.zeros(BINS, np.float32)
    filled = counts > 0
    lut[filled] = (sums[filled] / counts[filled]).astype(np.float32)
    return lut


def quantize(values: np.ndarray) -> Quantized:
    """Quantize float32 ``values`` (T, k) (finite; checked by the caller) to 2-bit codes and a codebook."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if v.ndim == 1:
        v = v.reshape(1, -1)
    n = v.size
    if n == 0:
        return Quantized(np.zeros(0, np.uint8), np.float32(0.0), np.zeros(BINS, np.float32))
    shift = shift_of(total(tile_sum(v.astype(np.float64))), n)
    c = v - shift
    c64 = c.astype(np.float64)
    thresholds = thresholds_of(total(tile_sum(c64 * c64)), n)
    codes = codes_of(c, thresholds)
    bin_sums = np.stack([tile_sum(np.where(codes == b, c64, 0.0)) for b in range(BINS)], axis=1)
    bin_counts = np.stack([(codes == b).sum(axis=1) for b in range(BINS)], axis=1)
    return Quantized(codes.reshape(-1), shift, lut_of(bin_sums, bin_counts))


def dequantize(codes: np.ndarray, shift: np.float32, lut: np.ndarray) -> np.ndarray:
    """float32 values ``lut[codes] + shift`` (the same float32 addition the encoder subtracts from its EF)."""
    # Overflow to Inf is possible with a hostile codebook; the decoder checks finiteness right after.
    with np.errstate(over="ignore"):
        return lut.astype(np.float32)[codes] + np.float32(shift)
