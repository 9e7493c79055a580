"""Dense low-precision codes for the compositions that send weights (V-B consensus, V-C).

* Block absmax: int8-style codes with one fp32 scale per block of BLOCK values; error ∝ the block's largest
  weight (docs/outer-methods.md, V-B pair: the prototype's 8-bit per-row absmax).
* Modulo lattice (Wyner–Ziv style side-information code): send k mod 2^b for k = round((x + u) / s), u a
  subtractive dither in [−s/2, s/2) that both sides draw from the same seed; the receiver, who holds a nearby
  tensor y (its own φ), picks the k ≡ sent (mod 2^b) whose value k·s − u is nearest to y, and returns k·s − u.
  The error is uniform in [−s/2, s/2] and independent of x, whatever the weights' norm; the decode is right
  exactly when that value lies within 2^(b-1)·s of y (a window symmetric around y), so the step s only has to
  cover the *distance* between the two peers' tensors. Outside the window a value wraps to a wrong one a
  multiple of 2^b·s away; `block_checks` (a 16-bit hash of the integer indices of each block of CHECK_BLOCK
  values) lets the receiver find the blocks where that happened (docs/outer-methods.md, V-C).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import torch

from shoal.gossip.outer.errors import OuterError
from shoal.gossip.outer.wire import CHECK_BLOCK, check_bytes, packed_bits

BLOCK = 64  # values per absmax scale: one fp32 per 64 values = 0.5 bit/param of side information
MAX_BITS = 8  # codes are stored one per byte


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= MAX_BITS:
        raise OuterError(f"quantizer bits must be in 2..{MAX_BITS}, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """uint8 codes < 2^bits -> bits-wide fields, most significant bit first, packed back to back."""
    _check_bits(bits)
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    fields = np.unpackbits(flat.reshape(-1, 1), axis=1)[:, 8 - bits :]
    return np.packbits(fields.reshape(-1)).tobytes()


def unpack_codes(raw: bytes, count: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`; `raw` must be exactly `packed_bits(count, bits)` bytes."""
    _check_bits(bits)
    if len(raw) != packed_bits(count, bits):
        raise OuterError(f"{len(raw)} bytes cannot hold {count} codes of {bits} bits")
    fields = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = fields
    return torch.from_numpy(np.packbits(padded, axis=1).reshape(-1))


def absmax_encode(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat tensor -> (fp32 scales per block, uint8 codes). Symmetric levels in [-(2^(b-1)-1), 2^(b-1)-1]."""
    _check_bits(bits)
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    levels = 2 ** (bits - 1) - 1
    scales = blocks.abs().amax(dim=1).clamp_min(1e-30) / levels
    codes = torch.round(blocks / scales[:, None]).clamp(-levels, levels) + levels
    return scales, codes.reshape(-1)[: flat.numel()].to(torch.uint8)


def absmax_decode(scales: torch.Tensor, codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    _check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    n = codes.numel()
    if scales.numel() != (n + BLOCK - 1) // BLOCK:
        raise OuterError(f"absmax code has {scales.numel()} scales for {n} values; expected one per {BLOCK}")
    values = codes.float() - levels
    return values * scales.repeat_interleave(BLOCK)[:n]


def _splitmix16(index: int) -> int:
    z = (index + 1) * 0x9E3779B97F4A7C15 % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return (z ^ (z >> 31)) & 0xFFFF


# Odd 16-bit weights, one per position in a block: a block's check is Σ w_i·k_i mod 2^16. A wrap moves one k_i
# by a multiple j·2^b (0 < |j| < 2^(16-b)) and changes the check by w_i·j·2^b ≠ 0 mod 2^16 (w_i odd), so one
# wrapped value in a block is always found; several at once escape with probability about 2^-(16-b).
_CHECK_WEIGHTS = torch.tensor([_splitmix16(i) | 1 for i in range(CHECK_BLOCK)], dtype=torch.int64)


# ---- The chunked coder (issue 17): the product's path. ----
#
# The functions above materialise whole-tensor int64 indices and float64 values (about ten 8-byte
# temporaries per parameter). The wire's k is defined by float64 arithmetic (`lattice_indices`), so the coder
# below does exactly those float64 operations, in the same order, but on CHUNK values at a time in scratch
# buffers that it reuses (they stay in the core's cache); per parameter it writes only the packed codes and
# checks (encode) or the float32 values and a bit per block (decode). Bytes and values equal the functions
# above (tests/outer/test_fast_codes.py).

# Values per scratch block: a multiple of CHECK_BLOCK (whole checks) and of 8 (whole packed bytes); its
# float64 buffers (128 KiB each) stay in L2.
CHUNK = 1 << 14
if sys.byteorder != "little":  # the packing reads codes through wider views (little-endian lanes)
    raise ImportError("gossip.outer.quant's lattice coder assumes a little-endian machine")
_WEIGHTS16 = np.tile(_CHECK_WEIGHTS.numpy().astype(np.uint16), CHUNK // CHECK_BLOCK)
_LANES = {4: np.uint32, 2: np.uint16}  # codes per byte -> the unsigned int holding one byte's codes


def _unpack_table(bits: int) -> np.ndarray:
    """byte -> its 8/bits codes, one per byte of a _LANES int (first code in the lowest byte)."""
    per = 8 // bits
    byte = np.arange(256, dtype=np.uint32)
    codes = [(byte >> (8 - bits * (j + 1))) & ((1 << bits) - 1) for j in range(per)]
    return sum((c << (8 * j) for j, c in enumerate(codes)), np.zeros(256, np.uint32)).astype(_LANES[per])


_UNPACK = {bits: _unpack_table(bits) for bits in (2, 4)}


class Scratch:
    """Buffers of CHUNK values that one encode or decode reuses for every chunk of every tensor."""

    def __init__(self) -> None:
        self.dither = np.empty(CHUNK, np.float64)
        self.work = np.empty(CHUNK, np.float64)
        self.c64 = np.empty(CHUNK, np.float64)
        self.k = np.empty(CHUNK, np.int64)
        self.codes = np.zeros(CHUNK, np.uint8)
        self.k16 = np.empty(CHUNK, np.uint16)
        self.prod = np.zeros(CHUNK, np.uint16)
        self.lanes = np.empty(CHUNK // 2, np.uint32)
        self.lanes2 = np.empty(CHUNK // 2, np.uint32)
        self.values = np.empty(CHUNK, np.float32)


class Dither:
    """`lattice_dither(count, step, seed)` a chunk at a time: PCG64's stream continues across calls."""

    def __init__(self, step: float, seed: int) -> None:
        self.gen = np.random.PCG64(seed)
        self.step = step
        # unit·step with unit = (m − 2^52)·2^-53 exactly: one rounding of the same real number as the
        # reference's unit * step, so one multiply by step·2^-53 when that constant is exact.
        scale = step * 2.0**-53
        self.scale = scale if scale * 2.0**53 == step else None

    def next(self, m: int, out: np.ndarray) -> np.ndarray:
        raw = self.gen.random_raw(m)
        np.right_shift(raw, np.uint64(11), out=raw)
        j = raw.view(np.int64)
        j -= 2**52  # |j| <= 2^52: exact in float64
        d = out[:m]
        np.copyto(d, j)
        d *= 2.0**-53 if self.scale is None else self.scale
        if self.scale is None:
            d *= self.step
        return d


def _pack_into(codes: np.ndarray, bits: int, out: np.ndarray, s: Scratch) -> None:
    """Codes (uint8, a multiple of 8 of them) -> bits-wide fields, MSB first, as `pack_codes` writes them."""
    if bits == 8:
        out[:] = codes
        return
    if 8 % bits == 0:  # one byte from the 8/bits codes of one wide lane: shift each code to its place
        per = 8 // bits
        lanes = codes.view(_LANES[per])
        acc = s.lanes.view(lanes.dtype)[: lanes.size]
        tmp = s.lanes2.view(lanes.dtype)[: lanes.size]
        np.left_shift(lanes, 8 - bits, out=acc)
        for j in range(1, per):  # code j sits at bit 8j and goes to bit 8 - bits·(j+1)
            np.right_shift(lanes, 8 * j - 8 + bits * (j + 1), out=tmp)
            acc |= tmp
        np.copyto(out, acc, casting="unsafe")  # the low byte
        return
    groups = codes.reshape(-1, 8)  # 8 codes = `bits` bytes
    acc64 = groups[:, 0].astype(np.uint64)
    for j in range(1, 8):
        acc64 <<= np.uint64(bits)
        acc64 |= groups[:, j]
    acc64 <<= np.uint64(64 - 8 * bits)
    out.reshape(-1, bits)[:] = acc64.astype(">u8").view(np.uint8).reshape(-1, 8)[:, :bits]


def _unpack_into(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Inverse of `_pack_into`: `out` (a multiple of 8 codes) from its packed bytes."""
    if bits == 8:
        out[:] = packed
        return
    if 8 % bits == 0:
        table = _UNPACK[bits]
        np.take(table, packed, out=out.view(table.dtype))
        return
    mask = (1 << bits) - 1
    wide = np.zeros((packed.size // bits, 8), np.uint8)
    wide[:, :bits] = packed.reshape(-1, bits)
    acc = wide.view(">u8").reshape(-1).astype(np.uint64)
    groups = out.reshape(-1, 8)
    for j in range(8):
        np.bitwise_and(acc >> np.uint64(64 - bits * (j + 1)), mask, out=groups[:, j], casting="unsafe")


def _checks_into(k: np.ndarray, scratch: Scratch, out: np.ndarray) -> None:
    """`block_checks` of a chunk's int64 indices (whole blocks but the last) into uint16 `out`.

    Σ w_i·k_i mod 2^16 needs only k_i mod 2^16: uint16 products and sums wrap exactly there.
    """
    m = k.size
    padded = out.size * CHECK_BLOCK
    k16, prod = scratch.k16[:m], scratch.prod[:padded]
    np.copyto(k16, k, casting="unsafe")  # k mod 2^16
    np.multiply(k16, _WEIGHTS16[:m], out=prod[:m])
    prod[m:] = 0
    prod.reshape(-1, CHECK_BLOCK).sum(axis=1, dtype=np.uint16, out=out)


def chunk_bounds(count: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, CHUNK):
        yield start, min(count, start + CHUNK)


def encode_packed(
    x: np.ndarray, step: float, bits: int, dither: Dither | None, scratch: Scratch | None = None
) -> tuple[bytes, bytes]:
    """(bit-packed codes k mod 2^b, block checks) of flat float32 `x`, as `pack_codes(lattice_encode(...))`
    and `block_checks(lattice_indices(...))` write them, with no per-parameter float64 or int64."""
    _check_bits(bits)
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    count = x.size
    codes = np.empty((count + 7) // 8 * bits, np.uint8)
    checks = np.empty(check_bytes(count) // 2, np.uint16)
    s = scratch or Scratch()
    for start, stop in chunk_bounds(count):
        m = stop - start
        y, k = s.work[:m], s.k[:m]
        if dither is None:
            np.copyto(y, x[start:stop])
        else:
            np.add(x[start:stop], dither.next(m, s.dither), out=y)
        y /= step
        np.rint(y, out=y)  # half to even, as torch.round
        with np.errstate(invalid="ignore"):  # inf and NaN become INT64_MIN, as torch's .long()
            np.copyto(k, y, casting="unsafe")
        m8 = (m + 7) // 8 * 8
        c = s.codes[:m8]
        np.bitwise_and(k, (1 << bits) - 1, out=c[:m], casting="unsafe")
        c[m:] = 0  # the last byte's padding, zeros like np.packbits
        _pack_into(c, bits, codes[start // 8 * bits : start // 8 * bits + m8 // 8 * bits], s)
        _checks_into(k, s, checks[start // CHECK_BLOCK : (stop + CHECK_BLOCK - 1) // CHECK_BLOCK])
    return codes[: packed_bits(count, bits)].tobytes(), checks.astype("<u2").tobytes()


def decode_chunks(
    raw: bytes,
    step: float,
    side: np.ndarray,
    bits: int,
    dither: Dither | None,
    checks: bytes | None = None,
    out: np.ndarray | None = None,
    nan_side: bool = True,
    scratch: Scratch | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Decode packed codes against flat float32 `side`, CHUNK values at a time.

    Yields (start, stop, float32 values, per block of the chunk: wrapped) with values as `lattice_decode`
    gives them; they are written into `out[start:stop]` when `out` is given, else into a buffer that the
    next chunk reuses. `wrapped` is all False without `checks`. `nan_side=False` promises a side without
    NaN: k is then exact in float64; a NaN needs the reference's int64 arithmetic, wrap-around included.
    """
    _check_bits(bits)
    count = side.size
    if len(raw) != packed_bits(count, bits):
        raise OuterError(f"{len(raw)} bytes cannot hold {count} codes of {bits} bits")
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    modulus = 1 << bits
    packed = np.frombuffer(raw, np.uint8)
    sent = None if checks is None else np.frombuffer(checks, "<u2")
    s = scratch or Scratch()
    got = np.empty(CHUNK // CHECK_BLOCK, np.uint16)
    for start, stop in chunk_bounds(count):
        m = stop - start
        m8 = (m + 7) // 8 * 8
        lo, hi = start // 8 * bits, start // 8 * bits + m8 // 8 * bits
        if hi > packed.size:  # the last chunk: whole groups of 8 codes, zero-padded
            src = np.zeros(hi - lo, np.uint8)
            src[: packed.size - lo] = packed[lo:]
        else:
            src = packed[lo:hi]
        _unpack_into(src, bits, s.codes[:m8])
        c = s.c64[:m]
        np.copyto(c, s.codes[:m])
        t, k = s.work[:m], s.k[:m]
        d = None if dither is None else dither.next(m, s.dither)
        if d is None:
            np.copyto(t, side[start:stop])
        else:
            np.add(side[start:stop], d, out=t)
        t /= step  # the side, in steps, on the dithered grid
        t -= c
        t *= 1.0 / modulus  # a power of two: the same as / modulus
        np.rint(t, out=t)
        with np.errstate(invalid="ignore"):
            if nan_side:  # int64 as the reference: NaN rounds to INT64_MIN, and modulus·INT64_MIN wraps to 0
                np.copyto(k, t, casting="unsafe")
                k *= modulus
                np.add(k, s.codes[:m], out=k, casting="unsafe")
                np.copyto(t, k)
            else:
                t *= modulus
                t += c  # k, exact in float64: |k| < 2^51 (MAX_INDEX)
                np.copyto(k, t, casting="unsafe")
        t *= step
        if d is not None:
            t -= d
        values = s.values[:m] if out is None else out[start:stop]
        np.copyto(values, t, casting="same_kind")
        n_blocks = (m + CHECK_BLOCK - 1) // CHECK_BLOCK
        if sent is None:
            wrapped = np.zeros(n_blocks, bool)
        else:
            _checks_into(k, s, got[:n_blocks])
            first = start // CHECK_BLOCK
            wrapped = got[:n_blocks] != sent[first : first + n_blocks]
        yield start, stop, values, wrapped


def lattice_dither(count: int, step: float, seed: int) -> torch.Tensor:
    """Subtractive dither in [−step/2, step/2), float64, from a generator both sides seed with `seed`.

    numpy's PCG64 bit generator: its raw stream is stable across numpy versions and machines, so the sender's
    and the receiver's dither are the same numbers.
    """
    raw = np.random.PCG64(seed).random_raw(count)
    unit = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5
    return torch.from_numpy(unit) * step


def _dither_like(x: torch.Tensor, dither: torch.Tensor | None) -> torch.Tensor | float:
    if dither is None:
        return 0.0
    if dither.numel() != x.numel():
        raise OuterError(f"lattice dither has {dither.numel()} values for {x.numel()}")
    return dither.reshape(-1).double()


def lattice_indices(x: torch.Tensor, step: float, dither: torch.Tensor | None = None) -> torch.Tensor:
    """int64 lattice indices k = round((x + u) / step) of a flat copy of x."""
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    flat = x.detach().double().reshape(-1)
    return torch.round((flat + _dither_like(flat, dither)) / step).long()


def lattice_encode(
    x: torch.Tensor, step: float, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 codes k mod 2^b of k = round((x + u) / step), u the dither (none: u = 0)."""
    _check_bits(bits)
    k = lattice_indices(x, step, dither)
    return torch.remainder(k, 2**bits).to(torch.uint8).view(x.shape)


def lattice_decode_indices(
    codes: torch.Tensor, step: float, side: torch.Tensor, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat int64 k ≡ codes (mod 2^b) whose value k·step − u is nearest to `side` (no rounding of the side).

    Right (the sender's k) exactly when |k·step − u − side| < 2^(b-1)·step: symmetric around the side.
    """
    _check_bits(bits)
    if codes.numel() != side.numel():
        raise OuterError(f"lattice code has {codes.numel()} values, side information {side.numel()}")
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    modulus = 2**bits
    flat_side = side.detach().double().reshape(-1)
    target = (flat_side + _dither_like(flat_side, dither)) / step  # the side, in steps, on the dithered grid
    c = codes.reshape(-1).long()
    return c + modulus * torch.round((target - c) / modulus).long()


def lattice_values(k: torch.Tensor, step: float, dither: torch.Tensor | None = None) -> torch.Tensor:
    """float64 values k·step − u of flat lattice indices."""
    return k.double() * step - _dither_like(k, dither)


def lattice_decode(
    codes: torch.Tensor, step: float, side: torch.Tensor, bits: int = 8, dither: torch.Tensor | None = None
) -> torch.Tensor:
    """The value ≡ codes (mod 2^b·step) nearest to `side`.

    Exact to step/2 when |x − side| < (2^(b-1) − ½)·step; see `lattice_decode_indices`.
    """
    k = lattice_decode_indices(codes, step, side, bits, dither)
    return lattice_values(k, step, dither).to(torch.float32).view(side.shape)


def block_checks(k: torch.Tensor) -> bytes:
    """16-bit check of each block of CHECK_BLOCK lattice indices (zero-padded), little-endian uint16s."""
    flat = torch.remainder(k.reshape(-1).long(), 2**16)
    pad = (-flat.numel()) % CHECK_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, CHECK_BLOCK)
    sums = torch.remainder((blocks * _CHECK_WEIGHTS).sum(dim=1), 2**16)
    return sums.numpy().astype("<u2").tobytes()


def wrapped_blocks(k: torch.Tensor, checks: bytes) -> torch.Tensor:
    """Bool per block of CHECK_BLOCK: True where the decoded indices `k` disagree with the sender's checks."""
    if len(checks) != check_bytes(k.numel()):
        raise OuterError(f"{len(checks)} check bytes for {k.numel()} lattice values")
    sent = torch.from_numpy(np.frombuffer(checks, dtype="<u2").astype(np.int64))
    got = torch.from_numpy(np.frombuffer(block_checks(k), dtype="<u2").astype(np.int64))
    return sent != got


def block_mask(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """Per-value bool mask (flat, `count` long) of the blocks flagged in `blocks`."""
    return blocks.repeat_interleave(CHECK_BLOCK)[:count]
