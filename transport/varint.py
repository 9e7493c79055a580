"""Unsigned LEB128 varints (multiformats unsigned-varint), as multiaddr, multistream and protobuf use.

Spec: https://github.com/multiformats/unsigned-varint. Decoding is bounded: at most MAX_VARINT_BYTES
bytes are read, and non-minimal encodings are refused as the spec requires.
"""

from .errors import ProtocolError

# The multiformats spec caps varints at 9 bytes (63 bits); protobuf allows 10 for uint64. We never need
# values above 2**63, so 9 bytes bound the work done on hostile input.
MAX_VARINT_BYTES = 9


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"uvarint cannot encode the negative value {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a varint at `offset`: returns (value, new_offset), or None when more bytes are needed.

    Raises ProtocolError on an over-long or non-minimal encoding.
    """
    value = 0
    shift = 0
    for i in range(MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            return None
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ProtocolError("varint is not minimally encoded; the peer's encoder is broken")
            return value, pos + 1
        shift += 7
    raise ProtocolError(f"varint longer than {MAX_VARINT_BYTES} bytes; refusing hostile input")
