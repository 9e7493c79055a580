"""A strict reader of Yjs v1 updates: which client wrote which clocks, and what it deletes.

pycrdt (yrs) trusts the lengths it decodes and knows nothing of authorship, so every update is read here
first, in pure Python, under explicit limits (`limits.py`). The reader accepts only what Shoal's writers
produce: root `Map`s holding plain values (`ContentAny`), deleted items and garbage-collected ranges.
Anything else (text, nested types, sub-documents, skips) is rejected before pycrdt sees it.

Format: the Yjs v1 update encoding (yjs `src/utils/encoding.js`, `readClientsStructRefs`,
`readDeleteSet`; lib0 `decoding.js` for varuints and `readAny`).
"""

import math
import struct
from dataclasses import dataclass

from .errors import Rejected
from .limits import MAX_CLOCK, MAX_DELETE_RANGES, MAX_STRING_BYTES, MAX_STRUCTS, MAX_VALUE_DEPTH

# Struct info byte: low 5 bits are the content reference, high bits flag optional fields.
_HAS_ORIGIN = 0x80
_HAS_RIGHT_ORIGIN = 0x40
_HAS_PARENT_SUB = 0x20
_CONTENT_MASK = 0x1F
_GC = 0
_CONTENT_DELETED = 1
_CONTENT_ANY = 8
_MAX_VARUINT_BYTES = 8  # 56 bits: more than MAX_CLOCK needs, fewer than a lying header wants


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    """What one update does, in Yjs identifiers."""

    client: int | None  # the one client whose structs it carries; None for a delete-only update
    clock: int  # first clock of those structs
    length: int  # clocks they cover
    deletes: tuple[tuple[int, int, int], ...]  # (client, clock, length) ranges it deletes


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise Rejected("Yjs update ends early; dropped")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Rejected(f"Yjs update claims {n} bytes past its end; dropped")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varuint(self) -> int:
        value = 0
        for i in range(_MAX_VARUINT_BYTES):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                return value
        raise Rejected("Yjs update holds a varuint longer than 8 bytes; dropped")

    def varint(self) -> int:
        b = self.byte()
        negative = bool(b & 0x40)
        value = b & 0x3F
        shift = 6
        more = b & 0x80
        while more:
            if shift > 7 * _MAX_VARUINT_BYTES:
                raise Rejected("Yjs update holds a varint longer than 8 bytes; dropped")
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
            more = b & 0x80
        return -value if negative else value

    def string(self) -> str:
        n = self.varuint()
        if n > MAX_STRING_BYTES:
            raise Rejected(f"Yjs update holds a {n}-byte string, limit {MAX_STRING_BYTES}; dropped")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("Yjs update holds a string that is not UTF-8; dropped") from exc

    def clock(self) -> int:
        v = self.varuint()
        if v > MAX_CLOCK:
            raise Rejected(f"Yjs update holds clock or client {v} above 2**53; dropped")
        return v

    def any(self, depth: int) -> None:
        # lib0 readAny; values are skipped, only their shape is checked.
        if depth > MAX_VALUE_DEPTH:
            raise Rejected(f"Yjs update nests values deeper than {MAX_VALUE_DEPTH}; dropped")
        tag = self.byte()
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            return
        if tag == 125:
            self.varint()
        elif tag == 124:
            self.take(4)
        elif tag in (123, 122):  # float64, bigint
            raw = self.take(8)
            if tag == 123 and not math.isfinite(_f64(raw)):
                raise Rejected("Yjs update holds a non-finite number; dropped")
        elif tag == 119:
            self.string()
        elif tag == 118:
            for _ in range(self._count()):
                self.string()
                self.any(depth + 1)
        elif tag == 117:
            for _ in range(self._count()):
                self.any(depth + 1)
        elif tag == 116:
            n = self.varuint()
            if n > MAX_STRING_BYTES:
                raise Rejected(f"Yjs update holds a {n}-byte buffer, limit {MAX_STRING_BYTES}; dropped")
            self.take(n)
        else:
            raise Rejected(f"Yjs update holds unknown value tag {tag}; dropped")

    def _count(self) -> int:
        n = self.varuint()
        # Every element costs at least one byte, so a count above the bytes left is a lie.
        if n > len(self.data) - self.pos:
            raise Rejected(f"Yjs update claims {n} elements with {len(self.data) - self.pos} bytes left")
        return n


def _f64(raw: bytes) -> float:
    return struct.unpack(">d", raw)[0]


def parse(data: bytes, roots: frozenset[str]) -> UpdateInfo:
    """Read one v1 update under limits; raise `Rejected` for anything Shoal's writers never produce.

    `roots` names the root maps the document may hold.
    """
    r = _Reader(data)
    n_clients = r.varuint()
    if n_clients > 1:
        raise Rejected(f"Yjs update carries structs of {n_clients} clients, one writer allowed; dropped")
    client: int | None = None
    start = length = 0
    if n_clients == 1:
        n_structs = r.varuint()
        if not 0 < n_structs <= MAX_STRUCTS:
            raise Rejected(f"Yjs update declares {n_structs} structs, limit {MAX_STRUCTS}; dropped")
        client = r.clock()
        start = r.clock()
        for _ in range(n_structs):
            length += _struct(r, client, start + length, roots)
        if start + length > MAX_CLOCK:
            raise Rejected("Yjs update runs its clock past 2**53; dropped")
    deletes: list[tuple[int, int, int]] = []
    n_ds_clients = r.varuint()
    if n_ds_clients > MAX_DELETE_RANGES:
        raise Rejected(f"Yjs update deletes for {n_ds_clients} clients; dropped")
    for _ in range(n_ds_clients):
        ds_client = r.clock()
        n_ranges = r.varuint()
        if n_ranges + len(deletes) > MAX_DELETE_RANGES:
            raise Rejected(f"Yjs update deletes more than {MAX_DELETE_RANGES} ranges; dropped")
        for _ in range(n_ranges):
            clock, n = r.clock(), r.clock()
            deletes.append((ds_client, clock, n))
    if r.pos != len(data):
        raise Rejected(f"Yjs update has {len(data) - r.pos} trailing bytes; dropped")
    return UpdateInfo(client, start, length, tuple(deletes))


def _struct(r: _Reader, client: int, clock: int, roots: frozenset[str]) -> int:
    """Skip one struct; return how many clocks it covers."""
    info = r.byte()
    ref = info & _CONTENT_MASK
    if ref == _GC:
        if info != _GC:
            raise Rejected(f"Yjs update holds a malformed GC struct (info {info}); dropped")
        return _positive(r.clock())
    if info & _HAS_RIGHT_ORIGIN:
        # Map writes only ever append after the key's last item; a right origin means a list or text.
        raise Rejected("Yjs update inserts before an item; Shoal documents hold root maps only")
    if info & _HAS_ORIGIN:
        # The item it follows must be its own writer's, and older: anything else would leave yrs
        # holding it as pending, which is how replicas silently diverge (docs/design.md, "Measured facts").
        if r.clock() != client or r.clock() >= clock:
            raise Rejected("Yjs update points at an item of another writer or of its future; dropped")
    else:
        # Parent: a root type by name (flag 1) or an item by ID. Shoal documents have only root maps.
        if r.varuint() != 1:
            raise Rejected("Yjs update nests a type inside an item; Shoal documents hold root maps only")
        root = r.string()
        if root not in roots:
            raise Rejected(f"Yjs update writes root {root!r}, which this document does not have; dropped")
        if info & _HAS_PARENT_SUB:
            r.string()
    if ref == _CONTENT_DELETED:
        return _positive(r.clock())
    if ref == _CONTENT_ANY:
        n = r._count()
        for _ in range(n):
            r.any(0)
        return _positive(n)
    raise Rejected(f"Yjs update holds content type {ref}; Shoal documents hold plain values only")


def _positive(n: int) -> int:
    if n == 0:
        raise Rejected("Yjs update holds an empty struct; dropped")
    return n
