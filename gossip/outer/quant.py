"""Dense low-precision codes for the compositions that send weights (V-B consensus, V-C).

* Block absmax: int8-style codes with one fp32 scale per block of BLOCK values; error ∝ the block's largest
  weight (docs/outer-methods.md, V-B pair: the prototype's 8-bit per-row absmax).
* Modulo lattice (Wyner–Ziv style side-information code): send k mod 2^b for k = round(x / s); the receiver,
  who holds a nearby tensor y (its own φ), picks the k ≡ sent (mod 2^b) closest to y / s. Error ≤ s/2 whatever
  the weights' norm, so the step s only has to cover the *distance* between the two peers' tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from shoal.gossip.outer.errors import OuterError
from shoal.gossip.outer.wire import packed_bits

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


def lattice_encode(x: torch.Tensor, step: float, bits: int = 8) -> torch.Tensor:
    """uint8 codes k mod 2^b of k = round(x / step)."""
    _check_bits(bits)
    if not step > 0:
        raise OuterError(f"lattice step must be > 0, got {step}")
    k = torch.round(x.detach().double() / step).long()
    return torch.remainder(k, 2**bits).to(torch.uint8)


def lattice_decode(codes: torch.Tensor, step: float, side: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The value ≡ codes (mod 2^b · step) nearest to `side`; exact to step/2 if |x − side| < 2^(b-1)·step."""
    _check_bits(bits)
    modulus = 2**bits
    if codes.numel() != side.numel():
        raise OuterError(f"lattice code has {codes.numel()} values, side information {side.numel()}")
    k_side = torch.round(side.detach().double().reshape(-1) / step).long()
    diff = torch.remainder(codes.reshape(-1).long() - k_side, modulus)
    diff = torch.where(diff >= modulus // 2, diff - modulus, diff)
    return ((k_side + diff).double() * step).to(torch.float32).view(side.shape)
