"""The few protobuf (proto2/proto3 wire format) pieces libp2p's small messages need.

libp2p's public keys, Noise handshake payload and identify message are tiny protobufs; a 60-line codec
beats a generated-code dependency. Decoding is bounded by the caller's size limit on the whole message and
refuses the wire types we never use (groups, fixed32/64 are skipped safely).
"""

from collections.abc import Iterator

from .errors import ProtocolError
from .varint import decode_uvarint, encode_uvarint

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5


def encode_len_field(number: int, value: bytes) -> bytes:
    return encode_uvarint(number << 3 | WIRE_LEN) + encode_uvarint(len(value)) + value


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_uvarint(number << 3 | WIRE_VARINT) + encode_uvarint(value)


def iter_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) pairs: ints for varint fields, bytes for length-delimited ones.

    Fixed-width fields are skipped; anything else (groups, truncation) raises ProtocolError.
    """
    pos = 0
    end = len(data)
    while pos < end:
        tag = decode_uvarint(data, pos)
        if tag is None:
            raise ProtocolError("truncated protobuf field tag")
        key, pos = tag
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value = decode_uvarint(data, pos)
            if value is None:
                raise ProtocolError("truncated protobuf varint")
            yield number, value[0]
            pos = value[1]
        elif wire == WIRE_LEN:
            length = decode_uvarint(data, pos)
            if length is None:
                raise ProtocolError("truncated protobuf length")
            size, pos = length
            if pos + size > end:
                raise ProtocolError(
                    f"protobuf field {number} claims {size} bytes past the end of the message"
                )
            yield number, bytes(data[pos : pos + size])
            pos += size
        elif wire == WIRE_FIXED64:
            pos += 8
        elif wire == WIRE_FIXED32:
            pos += 4
        else:
            raise ProtocolError(f"unsupported protobuf wire type {wire} in field {number}")
    if pos > end:
        raise ProtocolError("truncated protobuf fixed-width field")
