"""The 4-bin statistical quantizer of SparseLoCo (research-algorithms.md 2.2, pitfall P6), made deterministic.

Per tensor, over the kept values ``v`` (tile order, ascending position): ``shift = mean(v)``,
``c = v - shift``,
``scale = 1.5 * std(c)`` (n - 1 in the denominator; 1.0 when that is 0, NaN or Inf, or n < 2), and code
``q = #{j : c >= t_j}`` for the thresholds ``t = (-1.5, -0.5, +0.5) * scale`` (the reference's
``clamp(round(c / scale + 2), 0, 3)``, written as comparisons so that no rounding mode or fused multiply-add
can move a value across a bin edge). The codebook ``lut[b]`` is the mean of the ``c`` that fell in bin ``b``
(0 for an empty bin); a value decodes to ``lut[q] + shift`` in float32.

The statistics are computed here, on the host, in float64 with numpy's fixed summation order, by every
backend:
a GPU reduction sums in an order of its own, and one ulp of difference in ``scale`` moves values between bins,
which would break the byte-equality of the backends' payloads.
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


def quantize(values: np.ndarray) -> Quantized:
    """Quantize float32 ``values`` (finite; checked by the caller) to 2-bit codes with a 4-entry codebook."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    n = v.size
    if n == 0:
        return Quantized(np.zeros(0, np.uint8), np.float32(0.0), np.zeros(BINS, np.float32))
    shift = np.float32(v.astype(np.float64).sum() / n)
    c = v - shift
    c64 = c.astype(np.float64)
    std = float(np.sqrt(np.square(c64).sum() / (n - 1))) if n > 1 else 0.0
    scale = np.float32(RANGE_SIGMA / BINS * std)
    if not np.isfinite(scale) or scale == 0:
        scale = np.float32(1.0)
    thresholds = EDGES * scale
    codes = (c >= thresholds[0]).astype(np.uint8)
    codes += c >= thresholds[1]
    codes += c >= thresholds[2]
    counts = np.bincount(codes, minlength=BINS)
    sums = np.bincount(codes, weights=c64, minlength=BINS)
    lut = np.zeros(BINS, np.float32)
    filled = counts > 0
    lut[filled] = (sums[filled] / counts[filled]).astype(np.float32)
    return Quantized(codes, shift, lut)


def dequantize(codes: np.ndarray, shift: np.float32, lut: np.ndarray) -> np.ndarray:
    """float32 values ``lut[codes] + shift`` (the same float32 addition the encoder subtracts from its EF)."""
    # Overflow to Inf is possible with a hostile codebook; the decoder checks finiteness right after.
    with np.errstate(over="ignore"):
        return lut.astype(np.float32)[codes] + np.float32(shift)
