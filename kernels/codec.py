"""The codec API: encode a model's pseudo-gradients with error feedback, decode, accumulate.

One round of SparseLoCo (docs/outer-methods.md) per tensor: ``e <- beta * e + delta``; keep the top
``k`` entries of ``|e|`` per tile (kernels.topk); quantize them to 2 bits (kernels.quantize); pack indices
(fixed 12-bit or Rice-coded gaps, kernels.entropy) and codes into the wire format (kernels.wire); and take
exactly what was sent out of ``e`` (docs/outer-methods.md, P5), so what was not sent stays for later rounds.

The wire format is in docs/wire-format.md. ``decode`` treats a payload as hostile (wire.parse).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import torch

from shoal.kernels import entropy, packing, wire
from shoal.kernels.chunking import MAX_CHUNK, TileLayout, layout
from shoal.kernels.quantize import BINS, Quantized, dequantize, quantize
from shoal.kernels.topk import magnitude_keys, select
from shoal.kernels.wire import CODING_FIXED12, CODING_RICE, CodecError, TensorEntry

__all__ = [
    "CodecConfig",
    "CodecError",
    "SparseTensor",
    "SparseUpdate",
    "accumulate",
    "decode",
    "encode",
    "expected_of",
    "payload_bits_per_param",
]

log = logging.getLogger(__name__)

# Entries of one tensor processed at a time: bounds the scratch buffers (4 MiB of keys plus small index
# arrays) whatever the tensor size, and keeps them in cache.
BLOCK_ELEMS = 1 << 20


@dataclass(frozen=True)
class CodecConfig:
    chunk: int = 64  # tile side; largest divisor <= chunk per dimension
    topk_per_tile: int = 64  # kept per full 64x64 tile (64 -> 1.56 % density); scaled for small tiles
    bins: int = 4  # 2-bit values
    index_coding: str = "auto"  # "fixed12" | "entropy" | "auto" (smaller one per tensor)
    quantize: bool = True  # False sends fp32 values (full density, no quant = exact)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk <= MAX_CHUNK:
            raise CodecError(f"CodecConfig.chunk={self.chunk} must be in [1, {MAX_CHUNK}] (12-bit positions)")
        if not 1 <= self.topk_per_tile <= self.chunk * self.chunk:
            raise CodecError(f"CodecConfig.topk_per_tile={self.topk_per_tile} must be in [1, chunk**2]")
        if self.bins != BINS:
            raise CodecError(f"CodecConfig.bins={self.bins}: only {BINS} bins (2 bits) are implemented")
        if self.index_coding not in ("fixed12", "entropy", "auto"):
            raise CodecError(f"CodecConfig.index_coding={self.index_coding!r}: use fixed12, entropy or auto")


# dtypes a model tensor may have, by the name the payload carries (kernels.wire.DTYPE_NAMES).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert tuple(DTYPES) == wire.DTYPE_NAMES


@dataclass(frozen=True)
class SparseTensor:
    """A decoded tensor: ``values`` at row-major flat ``indices`` (ascending per tile) of ``shape``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor  # int64
    values: torch.Tensor  # float32

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32, device=device)
        out.view(-1).index_put_((self.indices.to(out.device),), self.values.to(out.device))
        return out


SparseUpdate = dict[str, SparseTensor]


def expected_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The ``expected`` argument of :func:`decode` for a model's named tensors."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def payload_bits_per_param(payload: bytes, n_params: int) -> float:
    """Bits on the wire per model parameter, everything counted (prefix, header, side information)."""
    return 8 * len(payload) / n_params


def _tile_view(e2: torch.Tensor, lay: TileLayout, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """The tiles [y0, y1) x [x0, x1) of the 2-D view as (by, bx, h, w) (a strided view, no copy)."""
    block = e2[y0 * lay.h : y1 * lay.h, x0 * lay.w : x1 * lay.w]
    return block.unflatten(0, (y1 - y0, lay.h)).unflatten(2, (x1 - x0, lay.w)).permute(0, 2, 1, 3)


def _select_tensor(e: torch.Tensor, lay: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in tile (T, k), flat row-major indices (T*k,)) of the entries to send, tile order."""
    e2 = e.view(lay.rows, lay.cols)
    ny, nx = lay.tiles_y, lay.tiles_x
    positions = torch.empty((ny, nx, lay.k), dtype=torch.int64, device=e.device)
    bx = max(1, min(nx, BLOCK_ELEMS // lay.tile_len))
    by = max(1, min(ny, BLOCK_ELEMS // (bx * lay.tile_len)))
    buf = torch.empty(by * bx * lay.tile_len, dtype=torch.float32, device=e.device)
    for y0 in range(0, ny, by):
        y1 = min(ny, y0 + by)
        for x0 in range(0, nx, bx):
            x1 = min(nx, x0 + bx)
            n = (y1 - y0) * (x1 - x0) * lay.tile_len
            tiles = buf[:n].view(y1 - y0, x1 - x0, lay.h, lay.w)
            keys = magnitude_keys(_tile_view(e2, lay, y0, y1, x0, x1), out=tiles)
            positions[y0:y1, x0:x1] = select(keys.view(-1, lay.tile_len), lay.k).view(y1 - y0, x1 - x0, lay.k)
    ty = torch.arange(ny, device=e.device).view(ny, 1, 1)
    tx = torch.arange(nx, device=e.device).view(1, nx, 1)
    rows = ty * lay.h + positions // lay.w
    cols = tx * lay.w + positions % lay.w
    flat = (rows * lay.cols + cols).view(-1)
    return positions.view(-1, lay.k), flat


def _index_section(positions: np.ndarray, coding: str) -> tuple[int, int, bytes, int]:
    """(coding, rice parameter, section bytes, unary length) with the smaller coding when ``auto``."""
    n = positions.size
    fixed_bits = 12 * n
    g = entropy.gaps(positions)
    r = entropy.best_rice_parameter(g)
    rice_bits = entropy.rice_size_bits(g, r) + 7  # + padding of the two streams, at most
    use_rice = coding == "entropy" or (coding == "auto" and rice_bits < fixed_bits)
    if use_rice:
        unary, low = entropy.encode(g, r)
        return CODING_RICE, r, unary + low, len(unary)
    return CODING_FIXED12, 0, packing.pack12(positions.reshape(-1)), 0


def _value_planes(codes: np.ndarray) -> tuple[list[list[int]], bytes]:
    """The two bit planes of the 2-bit codes, each raw or as exceptions (kernels.entropy)."""
    hi_desc, hi = entropy.encode_plane(codes >> 1)
    lo_desc, lo = entropy.encode_plane(codes & 1)
    return [hi_desc, lo_desc], hi + lo


# A backend's selection and quantization of one tensor (see torch_select for the contract).
Selection = tuple[np.ndarray, torch.Tensor, torch.Tensor, Quantized | None]


def torch_select(e: torch.Tensor, lay: TileLayout, quantized: bool) -> Selection:
    """The torch backend's selection and quantization of one tensor's error feedback ``e``.

    Returns (positions in tile (T, k) int64 on the host, flat indices and values on e's device, the
    quantized values or None when not quantizing). Values may be non-finite; the caller checks.
    """
    if lay.n_kept == 0:
        positions = torch.zeros((0, lay.k), dtype=torch.int64)
        flat = torch.zeros(0, dtype=torch.int64, device=e.device)
    else:
        positions, flat = _select_tensor(e, lay)
    values = e.view(-1).index_select(0, flat)
    q = None
    if quantized and bool(torch.isfinite(values).all()):
        q = quantize(values.cpu().numpy().reshape(-1, lay.k))
    return positions.cpu().numpy(), flat, values, q


SelectFn = Callable[[torch.Tensor, TileLayout, bool], Selection]


@torch.no_grad()  # deltas may come straight from parameters that require grad
def encode(
    deltas: Mapping[str, torch.Tensor],
    error_feedback: MutableMapping[str, torch.Tensor],
    config: CodecConfig,
    beta: float = 0.95,
    *,
    select_fn: SelectFn = torch_select,
) -> bytes:
    """Fold ``deltas`` into the error feedback, pack what to send, and take it out of the error feedback.

    ``e <- beta * e + delta; payload = pack(quantize(topk(e))); e <- e - decode(payload)``, per tensor, in
    place; a missing error-feedback entry starts as zeros (float32, contiguous, on the delta's device).
    Raises CodecError if a tensor's error feedback holds NaN or Inf (that tensor's buffer must then be reset).
    ``select_fn`` is the backend's selection and quantization (kernels.cupy_backend passes its own); the
    packing after it is shared, so backends that select and quantize alike write the same bytes.
    """
    entries: list[TensorEntry] = []
    body: list[bytes] = []
    for name, delta in deltas.items():
        e = error_feedback.get(name)
        if e is None:
            e = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
            error_feedback[name] = e
        if e.shape != delta.shape or e.dtype != torch.float32 or not e.is_contiguous():
            raise CodecError(
                f"error feedback of {name!r} must be a contiguous float32 tensor of shape "
                f"{tuple(delta.shape)}; got {e.dtype} {tuple(e.shape)}"
            )
        dtype_name = DTYPE_NAMES.get(delta.dtype)
        if dtype_name is None:
            raise CodecError(f"tensor {name!r} has dtype {delta.dtype}; the codec sends {list(DTYPES)}")
        torch.add(delta, e, alpha=beta, out=e)  # one pass: e = delta + beta * e
        lay = layout(tuple(delta.shape), config.chunk, config.topk_per_tile)
        positions, flat, values, q = select_fn(e, lay, config.quantize)
        if not bool(torch.isfinite(values).all()):
            raise CodecError(
                f"error feedback of {name!r} holds NaN or Inf (a non-finite delta?); "
                "reset that buffer to zeros before the next round"
            )
        planes = None
        if q is not None:
            sent = dequantize(q.codes, q.shift, q.lut)
            value_bytes, side = packing.pack2(q.codes), q.side()
            if config.index_coding != "fixed12":
                planes, plane_bytes = _value_planes(q.codes)
                if len(plane_bytes) < len(value_bytes):
                    value_bytes = plane_bytes
                else:  # skewed planes did not pay for their descriptors: plain 2-bit codes
                    planes = None
        else:
            sent = values.cpu().numpy()
            value_bytes, side = sent.astype("<f4").tobytes(), b""
        e_flat = e.view(-1)
        e_flat.index_copy_(0, flat, values - torch.from_numpy(sent).to(e.device))
        coding, rice_r, index_bytes, unary_len = _index_section(positions, config.index_coding)
        entries.append(
            TensorEntry(
                name, tuple(delta.shape), dtype_name, coding, rice_r, config.quantize, side, unary_len, planes
            )
        )
        body += [index_bytes, value_bytes]
    return wire.frame(config.chunk, config.topk_per_tile, config.bins, entries, body)


def decode(payload: bytes, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> SparseUpdate:
    """Decode a payload for a model of ``expected`` shapes and dtypes (see :func:`expected_of`).

    Hostile-safe: anything wrong (framing, version, header, lengths, indices, non-finite values, shapes or
    dtypes other than ``expected``) raises CodecError; buffers are sized only from ``expected`` shapes.
    """
    try:
        return _decode(payload, expected)
    except CodecError as exc:
        log.debug("codec payload of %d bytes rejected: %s", len(payload), exc)
        raise


def _decode(payload: bytes, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> SparseUpdate:
    named = {name: (shape, _dtype_name(name, dtype)) for name, (shape, dtype) in expected.items()}
    return {
        name: SparseTensor(t.shape, DTYPES[t.dtype], torch.from_numpy(t.indices), torch.from_numpy(t.values))
        for name, t in wire.read(payload, named).items()
    }


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise CodecError(f"tensor {name!r} has dtype {dtype}; the codec sends {list(DTYPES)}")
    return DTYPE_NAMES[dtype]


def accumulate(update: SparseUpdate, into: MutableMapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """``into[name] += scale * dense(update[name])`` for every tensor of the update, without densifying."""
    for name, sparse in update.items():
        target = into[name]
        if tuple(target.shape) != sparse.shape:
            raise CodecError(f"cannot accumulate {name!r} of shape {sparse.shape} into {tuple(target.shape)}")
        values = sparse.values.to(device=target.device, dtype=target.dtype)
        if scale != 1.0:
            values = values * scale
        indices = sparse.indices.to(target.device)
        if target.is_contiguous():
            target.view(-1).index_add_(0, indices, values)
        else:
            target.put_(indices, values, accumulate=True)
