"""The payload format (docs/wire-format.md): framing, header schema, section lengths, limits.

    b"SHLC" | u32 little-endian header length | msgpack header | body

The header is a msgpack map ``{"v": 1, "chunk": int, "topk": int, "bins": 4, "tensors": [entry, ...]}`` with
one entry per tensor, ``[name, shape, dtype, coding, rice_r, quantized, side, unary_len, planes]``. The
body holds, for each tensor in header order, its index section then its value section; every section length
follows from the header and the expected model, so the parser checks the body length exactly before
decoding.

Parsing is hostile-safe: every failure is one :class:`CodecError`, and no buffer is sized from a number in the
payload before that number has been checked against the expected model.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

import msgpack
import numpy as np

from shoal.errors import ShoalError
from shoal.kernels import entropy, packing
from shoal.kernels.chunking import MAX_CHUNK, TileLayout, layout
from shoal.kernels.packing import packed2_len, packed12_len
from shoal.kernels.quantize import BINS, dequantize

MAGIC = b"SHLC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sI")

CODING_FIXED12 = 0
CODING_RICE = 1
CODINGS = {"fixed12": CODING_FIXED12, "entropy": CODING_RICE}

# Fields of a tensor entry in the header (see the module docstring).
ENTRY_FIELDS = 9
# Side information of a quantized tensor: shift and a 4-entry codebook, float32 each.
SIDE_BYTES = 20
# Longest tensor name accepted: parameter paths of real models are < 200 characters.
MAX_NAME_LEN = 512
# Highest tensor rank accepted: models use <= 5 (conv3d weights).
MAX_RANK = 8
# Header bytes allowed per expected tensor: an entry's worst case is a 512-byte name, 8 dimensions and two
# plane descriptors of 9-byte integers, 20 bytes of side information and a few integers (< 800 bytes);
# anything larger is not a header this codec wrote.
HEADER_BYTES_PER_TENSOR = 1024
HEADER_BYTES_FIXED = 256

# dtypes a model tensor may have; the payload carries the name so the receiver can check it.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
# What a receiver expects of a model's tensors: name -> (shape, dtype name).
Expected = Mapping[str, tuple[tuple[int, ...], str]]


class CodecError(ShoalError):
    """A payload could not be encoded or decoded; the message says which tensor and why."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry, checked."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    coding: int
    rice_r: int
    quantized: bool
    side: bytes
    unary_len: int
    # None: 2-bit codes packed four per byte; else [high plane, low plane] descriptors (kernels.entropy).
    planes: list[list[int]] | None = None

    def pack(self) -> list:
        return [
            self.name,
            list(self.shape),
            self.dtype,
            self.coding,
            self.rice_r,
            int(self.quantized),
            self.side,
            self.unary_len,
            self.planes,
        ]


def index_section_len(entry: TensorEntry, lay: TileLayout) -> int:
    if entry.coding == CODING_FIXED12:
        return packed12_len(lay.n_kept)
    return entry.unary_len + entropy.low_len(lay.n_kept, entry.rice_r)


def value_section_len(entry: TensorEntry, lay: TileLayout) -> int:
    if not entry.quantized:
        return 4 * lay.n_kept
    if entry.planes is None:
        return packed2_len(lay.n_kept)
    return sum(entropy.plane_len(p, lay.n_kept) for p in entry.planes)


def frame(chunk: int, topk: int, bins: int, entries: list[TensorEntry], body: list[bytes]) -> bytes:
    header = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "chunk": chunk,
            "topk": topk,
            "bins": bins,
            "tensors": [e.pack() for e in entries],
        },
        use_bin_type=True,
    )
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *body])


@dataclass(frozen=True)
class Parsed:
    chunk: int
    topk: int
    entries: list[tuple[TensorEntry, TileLayout]]
    body: memoryview


def _fail(what: str) -> CodecError:
    return CodecError(f"rejected codec payload: {what}; drop it and score its sender down")


def _is_int(x: object, lo: int, hi: int) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def parse(payload: bytes, expected: Expected, bins: int) -> Parsed:
    """Check framing, header and section lengths of ``payload`` against the ``expected`` model."""
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise _fail(f"{len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise _fail(f"magic {bytes(magic)!r} is not {MAGIC!r}")
    max_header = HEADER_BYTES_FIXED + HEADER_BYTES_PER_TENSOR * len(expected)
    if header_len > min(max_header, len(view) - _PREFIX.size):
        raise _fail(f"header length {header_len} exceeds the payload or the limit {max_header}")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size : _PREFIX.size + header_len],
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_NAME_LEN,
            max_bin_len=SIDE_BYTES,
            max_array_len=max(len(expected), MAX_RANK, ENTRY_FIELDS),
            max_map_len=8,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _fail(f"header is not valid bounded msgpack ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail("header is not a map")
    if header.get("v") != FORMAT_VERSION:
        raise _fail(f"format version {header.get('v')!r} is not {FORMAT_VERSION} (upgrade the older peer)")
    chunk, topk = header.get("chunk"), header.get("topk")
    if not _is_int(chunk, 1, MAX_CHUNK):
        raise _fail(f"chunk {chunk!r} is not in [1, {MAX_CHUNK}]")
    if not _is_int(topk, 1, chunk * chunk):
        raise _fail(f"topk {topk!r} is not in [1, {chunk * chunk}]")
    if header.get("bins") != bins:
        raise _fail(f"bins {header.get('bins')!r} is not {bins}")
    raw_entries = header.get("tensors")
    if not isinstance(raw_entries, list):
        raise _fail("tensor list missing")
    entries: list[tuple[TensorEntry, TileLayout]] = []
    seen: set[str] = set()
    offset = _PREFIX.size + header_len
    for raw in raw_entries:
        entry, lay = _check_entry(raw, expected, seen, chunk, topk)
        entries.append((entry, lay))
        offset += index_section_len(entry, lay) + value_section_len(entry, lay)
    missing = set(expected) - seen
    if missing:
        raise _fail(f"tensors {sorted(missing)[:5]} of the model are missing")
    if offset != len(view):
        raise _fail(
            f"body is {len(view) - _PREFIX.size - header_len} bytes, the header declares "
            f"{offset - _PREFIX.size - header_len}"
        )
    return Parsed(chunk, topk, entries, view[_PREFIX.size + header_len :])


def _check_entry(
    raw: object,
    expected: Expected,
    seen: set[str],
    chunk: int,
    topk: int,
) -> tuple[TensorEntry, TileLayout]:
    if not isinstance(raw, list) or len(raw) != ENTRY_FIELDS:
        raise _fail(f"a tensor entry is not a {ENTRY_FIELDS}-element list")
    name, shape, dtype, coding, rice_r, quantized, side, unary_len, planes = raw
    if not isinstance(name, str) or name not in expected:
        raise _fail(f"tensor {str(name)[:80]!r} is not in the model")
    if name in seen:
        raise _fail(f"tensor {name!r} appears twice")
    seen.add(name)
    want_shape, want_dtype = expected[name]
    if not isinstance(shape, list) or tuple(shape) != tuple(want_shape):
        raise _fail(f"tensor {name!r} has shape {str(shape)[:80]}, the model has {tuple(want_shape)}")
    if dtype not in DTYPE_NAMES or dtype != want_dtype:
        raise _fail(f"tensor {name!r} has dtype {str(dtype)[:20]!r}, the model has {want_dtype}")
    if coding not in (CODING_FIXED12, CODING_RICE) or isinstance(coding, bool):
        raise _fail(f"tensor {name!r}: unknown index coding {coding!r}")
    if not _is_int(rice_r, 0, entropy.MAX_RICE) or (coding == CODING_FIXED12 and rice_r != 0):
        raise _fail(f"tensor {name!r}: Rice parameter {rice_r!r} out of range")
    if quantized not in (0, 1) or isinstance(quantized, bool):
        raise _fail(f"tensor {name!r}: quantized flag {quantized!r} is not 0 or 1")
    if not isinstance(side, bytes) or len(side) != (SIDE_BYTES if quantized else 0):
        raise _fail(f"tensor {name!r}: side information has the wrong size")
    lay = layout(tuple(want_shape), chunk, topk)
    max_unary = entropy.max_unary_len(lay.n_kept, lay.numel, rice_r) if coding == CODING_RICE else 0
    if not _is_int(unary_len, 0, max_unary):
        raise _fail(f"tensor {name!r}: unary stream length {unary_len!r} is not in [0, {max_unary}]")
    if planes is not None and not (
        quantized
        and isinstance(planes, list)
        and len(planes) == 2
        and all(entropy.check_plane(p, lay.n_kept) for p in planes)
    ):
        raise _fail(f"tensor {name!r}: malformed value bit-plane descriptors")
    shape_t = tuple(want_shape)
    entry = TensorEntry(name, shape_t, dtype, coding, rice_r, bool(quantized), side, unary_len, planes)
    return entry, lay


@dataclass(frozen=True)
class SparseArrays:
    """One decoded tensor: fp32 ``values`` at row-major flat ``indices`` (int64, ascending per tile)."""

    shape: tuple[int, ...]
    dtype: str
    indices: np.ndarray
    values: np.ndarray


def read(payload: bytes, expected: Expected, bins: int = BINS) -> dict[str, SparseArrays]:
    """Every tensor of a payload as numpy arrays, checked against ``expected`` (no torch needed).

    Hostile-safe: framing, header, lengths, indices and non-finite values raise CodecError; buffers are
    sized only from ``expected`` shapes.
    """
    parsed = parse(payload, expected, bins)
    body, offset = parsed.body, 0
    update: dict[str, SparseArrays] = {}
    for entry, lay in parsed.entries:
        n = lay.n_kept
        index_len = index_section_len(entry, lay)
        index_bytes = body[offset : offset + index_len]
        offset += index_len
        value_len = value_section_len(entry, lay)
        value_bytes = body[offset : offset + value_len]
        offset += value_len
        positions = _decode_positions(entry, lay, index_bytes)
        values = _decode_values(entry, n, value_bytes)
        ty = np.arange(lay.n_tiles, dtype=np.int64).reshape(-1, 1) // lay.tiles_x
        tx = np.arange(lay.n_tiles, dtype=np.int64).reshape(-1, 1) % lay.tiles_x
        flat = (ty * lay.h + positions // lay.w) * lay.cols + tx * lay.w + positions % lay.w
        update[entry.name] = SparseArrays(entry.shape, entry.dtype, flat.reshape(-1), values)
    return update


def _reject(entry: TensorEntry, what: str) -> CodecError:
    return CodecError(
        f"rejected codec payload: tensor {entry.name!r} {what}; drop it and score its sender down"
    )


def _decode_positions(entry: TensorEntry, lay: TileLayout, data: memoryview) -> np.ndarray:
    n, k = lay.n_kept, lay.k
    if n == 0:
        return np.zeros((0, k), np.int64)
    if entry.coding == CODING_FIXED12:
        positions = packing.unpack12(data, n).reshape(lay.n_tiles, k)
        if k > 1 and not bool((np.diff(positions, axis=1) > 0).all()):
            raise _reject(entry, "has indices that are not strictly increasing within a tile")
    else:
        unary, low = data[: entry.unary_len], data[entry.unary_len :]
        g = entropy.decode(unary, low, n, entry.rice_r)
        if g is None or (entry.unary_len and unary[-1] == 0):
            raise _reject(entry, f"has a unary stream that does not hold exactly {n} codes")
        positions = entropy.positions(g, lay.n_tiles, k)
    if int(positions[:, -1].max()) >= lay.tile_len:
        raise _reject(entry, f"has an index beyond its tile of {lay.tile_len} entries")
    return positions


def _decode_values(entry: TensorEntry, n: int, data: memoryview) -> np.ndarray:
    if entry.quantized:
        side = np.frombuffer(entry.side, "<f4")
        shift, lut = side[0], side[1:]
        if entry.planes is None:
            codes = packing.unpack2(data, n)
        else:
            hi_len = entropy.plane_len(entry.planes[0], n)
            hi = entropy.decode_plane(entry.planes[0], data[:hi_len], n)
            lo = entropy.decode_plane(entry.planes[1], data[hi_len:], n)
            if hi is None or lo is None:
                raise _reject(entry, "has a malformed value bit plane")
            codes = (hi << 1) | lo
        values = dequantize(codes, shift, lut)
    else:
        values = np.frombuffer(data, "<f4").astype(np.float32)
    if not bool(np.isfinite(values).all()):
        raise _reject(entry, "carries NaN or Inf values")
    return values
