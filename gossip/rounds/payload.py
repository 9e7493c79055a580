"""The walking skeleton's round payload: every tensor dense, little-endian float32.

Layout: a 4-byte big-endian header length, a msgpack header `{"v": 1, "format": "dense-f32",
"tensors": [[name, [dims...]], ...]}`, then the tensors' values back to back. The SparseLoCo codec
(kernels/codec.py) replaces this on the wire; the validation rules below (shape against the model,
exact length, finite values) stay the same for any payload: nothing reaches the weights unchecked.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import msgpack
import numpy as np

from kernels.errors import ShoalError

VERSION = 1
FORMAT = "dense-f32"
HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20  # names and shapes of a model: far below a megabyte
MAX_TENSORS = 10_000
MAX_DIMS = 8

TensorSpec = Sequence[tuple[str, tuple[int, ...]]]  # the model's tensors, in a fixed order


class PayloadError(ShoalError):
    """A round payload is malformed, does not match the model, or carries non-finite values."""


def spec_size(spec: TensorSpec) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec)


def max_payload_bytes(spec: TensorSpec) -> int:
    return HEADER_LENGTH.size + MAX_HEADER_BYTES + 4 * spec_size(spec)


def encode(spec: TensorSpec, values: np.ndarray) -> bytes:
    """`values`: all tensors flattened and concatenated in spec order, float32."""
    if values.dtype != np.float32 or values.size != spec_size(spec):
        raise PayloadError(f"expected {spec_size(spec)} float32 values, got {values.size} {values.dtype}")
    header = msgpack.packb(
        {"v": VERSION, "format": FORMAT, "tensors": [[name, list(shape)] for name, shape in spec]},
        use_bin_type=True,
    )
    return HEADER_LENGTH.pack(len(header)) + header + values.astype("<f4", copy=False).tobytes()


def decode(payload: bytes | memoryview, spec: TensorSpec) -> np.ndarray:
    """Checks everything about a payload against the model's spec; returns the flat float32 values.

    Raises PayloadError before allocating anything larger than the model itself.
    """
    payload = memoryview(payload)
    if len(payload) < HEADER_LENGTH.size:
        raise PayloadError(f"payload of {len(payload)} bytes is too short to hold a header")
    (header_length,) = HEADER_LENGTH.unpack_from(payload)
    if header_length > MAX_HEADER_BYTES or HEADER_LENGTH.size + header_length > len(payload):
        raise PayloadError(f"payload header length {header_length} is out of bounds ({len(payload)} bytes)")
    header = _decode_header(payload[HEADER_LENGTH.size : HEADER_LENGTH.size + header_length])
    if header.get("v") != VERSION or header.get("format") != FORMAT:
        raise PayloadError(f"unsupported payload version/format {header.get('v')!r}/{header.get('format')!r}")
    _check_tensors(header.get("tensors"), spec)
    data = payload[HEADER_LENGTH.size + header_length :]
    expected_bytes = 4 * spec_size(spec)
    if len(data) != expected_bytes:
        raise PayloadError(f"payload carries {len(data)} bytes of values, the model needs {expected_bytes}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise PayloadError(f"payload carries {bad} non-finite values")
    return values


def _decode_header(raw: memoryview) -> Mapping:
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            max_str_len=1024,
            max_bin_len=0,
            max_array_len=MAX_TENSORS,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as error:
        raise PayloadError(f"undecodable payload header: {error}") from error
    if not isinstance(header, dict):
        raise PayloadError("payload header is not a map")
    return header


def _check_tensors(tensors: object, spec: TensorSpec) -> None:
    if not isinstance(tensors, list) or len(tensors) != len(spec):
        raise PayloadError(f"payload lists {_count(tensors)} tensors, the model has {len(spec)}")
    for entry, (name, shape) in zip(tensors, spec, strict=True):
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or entry[0] != name
            or not isinstance(entry[1], list)
            or len(entry[1]) > MAX_DIMS
            or tuple(entry[1]) != tuple(shape)
        ):
            raise PayloadError(
                f"payload tensor {entry!r:.120} does not match the model's {name} {list(shape)}"
            )


def _count(tensors: object) -> str:
    return str(len(tensors)) if isinstance(tensors, list) else "no list of"
