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
