"""What the daemon checks in a partner's round message before it reaches the worker.

A message is the outer method's envelope (gossip/outer/wire.py). The daemon knows the model's tensor
names and shapes (from its worker) and the run's method, so it can refuse, with a log line and before
anything is copied into the worker's shared memory: an oversized or undecodable envelope, another
method or version, a tensor list that does not match the model, byte counts that do not fit the
shapes, non-finite values or steps, and codec payloads that fail the codec's own hostile-safe decoder.
What only the weights can tell (a lattice code decoded against our own slow weights) the worker checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np

from shoal.errors import ShoalError
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.wire import check_bytes, packed_bits, unpack
from shoal.kernels import wire as codec_wire
from shoal.kernels.wire import CodecError

TensorSpec = Sequence[tuple[str, tuple[int, ...]]]  # the model's tensors
DENSE_METHODS = ("noloco",)  # the product methods the daemon runs (gossip/outer/methods.py)
LATTICE_METHODS = ("compressed-noloco",)
ENVELOPE_SLACK = 1 << 20  # msgpack framing, names and side information around the tensor bytes


class PayloadError(ShoalError):
    """A round message is malformed, belongs to another method, or does not fit the model."""


def spec_size(spec: TensorSpec) -> int:
    return sum(math.prod(shape) for _, shape in spec)


def max_payload_bytes(spec: TensorSpec) -> int:
    """No method's message is larger than the model in fp32 plus its envelope."""
    return 4 * spec_size(spec) + ENVELOPE_SLACK


def check_message(payload: bytes | memoryview, method: str, spec: TensorSpec, lattice_bits: int) -> None:
    """Raises PayloadError for anything wrong with a partner's message that the model's shapes reveal.

    `lattice_bits`: the bits per value of the run's lattice code (the worker says, in its hello).
    """
    if len(payload) > max_payload_bytes(spec):
        raise PayloadError(
            f"message of {len(payload)} bytes exceeds the model's bound {max_payload_bytes(spec)}"
        )
    try:
        # msgpack reads any buffer: the payload is checked where it lies (the worker's segment), uncopied
        message = unpack(cast(bytes, payload), method)
    except OuterMessageError as error:
        raise PayloadError(str(error)) from error
    layout = sorted(spec)  # the outer methods list tensors in sorted-name order
    if method in DENSE_METHODS or method in LATTICE_METHODS:
        if len(message.tensors) != len(layout):
            raise PayloadError(f"message lists {len(message.tensors)} tensors, the model has {len(layout)}")
        bits = 32 if method in DENSE_METHODS else lattice_bits
        for (name, shape), raw in zip(layout, message.tensors, strict=True):
            if len(raw) != packed_bits(math.prod(shape), bits):
                raise PayloadError(
                    f"tensor {name} carries {len(raw)} bytes; it does not match the model's {list(shape)}"
                )
            if bits == 32 and not np.isfinite(np.frombuffer(raw, dtype="<f4")).all():
                raise PayloadError(f"tensor {name} carries non-finite values")
        if method in LATTICE_METHODS and (
            len(message.steps) != len(layout) or not all(math.isfinite(s) and s > 0 for s in message.steps)
        ):
            raise PayloadError("lattice steps are missing, non-finite or not positive")
        # Lattice block checks (wire version 2): one list entry per tensor, 2 bytes per block of 256 values.
        # A message without them passes here and is refused by the worker (compressed_noloco.read_lattice).
        if message.checks and (
            method not in LATTICE_METHODS
            or len(message.checks) != len(layout)
            or any(
                len(h) != check_bytes(math.prod(shape))
                for (_, shape), h in zip(layout, message.checks, strict=True)
            )
        ):
            raise PayloadError("lattice block checks do not match the model's tensors")
    elif message.update is None:
        raise PayloadError(f"a {method} message must carry a codec payload")
    else:
        try:
            codec_wire.read(message.update, {name: (shape, "float32") for name, shape in layout})
        except CodecError as error:
            raise PayloadError(f"codec payload: {error}") from error
