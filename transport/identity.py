"""Identity: Ed25519 keys, libp2p PeerIDs and key files.

Spec: https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md. A PeerID is the multihash of the
protobuf-encoded public key: the identity multihash when that encoding is at most 42 bytes (always so for
Ed25519), sha2-256 otherwise; its text form is base58btc ("12D3KooW..." for Ed25519 keys).

Shoal's own keys are Ed25519. Verification also accepts the other key types libp2p defines
(secp256k1, ECDSA, RSA) so that peers of other implementations can prove who they are.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .errors import KeyFileError, ProtocolError
from .protobuf import encode_len_field, encode_varint_field, iter_fields

KEY_TYPE_RSA = 0
KEY_TYPE_ED25519 = 1
KEY_TYPE_SECP256K1 = 2
KEY_TYPE_ECDSA = 3

MULTIHASH_IDENTITY = 0x00
MULTIHASH_SHA2_256 = 0x12
# Per the peer-id spec: keys whose protobuf encoding is at most 42 bytes are inlined (identity multihash).
MAX_INLINE_KEY_LENGTH = 42
# An RSA-4096 key in PKIX DER is about 550 bytes; 2 KiB bounds what a peer can make us parse as a key.
MAX_PUBLIC_KEY_LENGTH = 2048
# Key files hold one protobuf PrivateKey (68 bytes for Ed25519); anything much larger is not ours.
MAX_KEY_FILE_LENGTH = 4096

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
# A sha2-256 multihash is 34 bytes and an inlined key at most 44: 128 base58 characters is generous.
MAX_PEER_ID_TEXT_LENGTH = 128


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    out = bytearray()
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    out.extend(b"1" * zeros)
    out.reverse()
    return out.decode("ascii")


def b58decode(text: str) -> bytes:
    raw = text.encode("ascii", errors="replace")
    number = 0
    for char in raw:
        if char not in _B58_INDEX:
            raise ValueError(f"{text!r} is not base58btc")
        number = number * 58 + _B58_INDEX[char]
    zeros = len(raw) - len(raw.lstrip(b"1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


# ---------------------------------------------------------------- public keys


def encode_public_key(key: ed25519.Ed25519PublicKey) -> bytes:
    """The libp2p protobuf PublicKey {Type: Ed25519, Data: 32 raw bytes}."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return encode_varint_field(1, KEY_TYPE_ED25519) + encode_len_field(2, raw)


@dataclass(frozen=True)
class PublicKey:
    """A peer's public key in libp2p's protobuf form, able to verify that peer's signatures."""

    key_type: int
    data: bytes

    @classmethod
    def from_protobuf(cls, encoded: bytes) -> PublicKey:
        if len(encoded) > MAX_PUBLIC_KEY_LENGTH:
            raise ProtocolError(f"public key of {len(encoded)} bytes exceeds {MAX_PUBLIC_KEY_LENGTH}")
        key_type: int | None = None
        data: bytes | None = None
        for number, value in iter_fields(encoded):
            if number == 1 and isinstance(value, int):
                key_type = value
            elif number == 2 and isinstance(value, bytes):
                data = value
        if key_type is None or data is None:
            raise ProtocolError("public key protobuf lacks its Type or Data field")
        if key_type == KEY_TYPE_ED25519 and len(data) != 32:
            raise ProtocolError(f"Ed25519 public key must be 32 bytes, got {len(data)}")
        if key_type not in (KEY_TYPE_RSA, KEY_TYPE_ED25519, KEY_TYPE_SECP256K1, KEY_TYPE_ECDSA):
            raise ProtocolError(f"unknown public key type {key_type}")
        return cls(key_type, data)

    def to_protobuf(self) -> bytes:
        return encode_varint_field(1, self.key_type) + encode_len_field(2, self.data)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's signature of `message` (libp2p's per-type conventions)."""
        try:
            if self.key_type == KEY_TYPE_ED25519:
                ed25519.Ed25519PublicKey.from_public_bytes(self.data).verify(signature, message)
            elif self.key_type == KEY_TYPE_SECP256K1:
                point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), self.data)
                point.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif self.key_type == KEY_TYPE_ECDSA:
                key = serialization.load_der_public_key(self.data)
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    return False
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            else:
                key = serialization.load_der_public_key(self.data)
                if not isinstance(key, rsa.RSAPublicKey):
                    return False
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def peer_id(self) -> PeerID:
        return PeerID.from_public_key_protobuf(self.to_protobuf())


# ---------------------------------------------------------------- peer ids


@dataclass(frozen=True, order=True)
class PeerID:
    """A libp2p peer id: the multihash bytes; `str()` gives the base58btc text form."""

    multihash: bytes

    @classmethod
    def from_public_key_protobuf(cls, encoded: bytes) -> PeerID:
        if len(encoded) <= MAX_INLINE_KEY_LENGTH:
            return cls(bytes((MULTIHASH_IDENTITY, len(encoded))) + encoded)
        return cls(bytes((MULTIHASH_SHA2_256, 32)) + hashlib.sha256(encoded).digest())

    @classmethod
    def from_public_key(cls, key: ed25519.Ed25519PublicKey) -> PeerID:
        return cls.from_public_key_protobuf(encode_public_key(key))

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerID:
        """Parse and check a binary multihash (as it travels inside multiaddrs)."""
        if len(data) < 2:
            raise ProtocolError("peer id shorter than a multihash header")
        code, length = data[0], data[1]
        if length != len(data) - 2:
            raise ProtocolError(f"peer id multihash says {length} bytes but holds {len(data) - 2}")
        if code == MULTIHASH_IDENTITY:
            if length > MAX_INLINE_KEY_LENGTH:
                raise ProtocolError(f"inlined key of {length} bytes exceeds {MAX_INLINE_KEY_LENGTH}")
        elif code == MULTIHASH_SHA2_256:
            if length != 32:
                raise ProtocolError("sha2-256 peer id must hold 32 bytes")
        else:
            raise ProtocolError(f"peer id uses unsupported multihash code {code:#x}")
        return cls(bytes(data))

    @classmethod
    def from_string(cls, text: str) -> PeerID:
        if not text or len(text) > MAX_PEER_ID_TEXT_LENGTH:
            raise ValueError(f"{text[:40]!r}... is not a peer id (bad length)")
        try:
            return cls.from_bytes(b58decode(text))
        except ProtocolError as exc:
            raise ValueError(f"{text!r} is not a valid peer id: {exc}") from exc

    def public_key(self) -> PublicKey | None:
        """The public key inlined in an identity multihash, or None for hashed ids."""
        if self.multihash[0] != MULTIHASH_IDENTITY:
            return None
        return PublicKey.from_protobuf(self.multihash[2:])

    def matches_public_key(self, key: PublicKey) -> bool:
        return key.peer_id() == self

    def __str__(self) -> str:
        return self.text

    @functools.cached_property
    def text(self) -> str:
        """The base58btc form, computed once (peer ids are printed in every log line about a peer)."""
        return b58encode(self.multihash)

    def __repr__(self) -> str:
        return f"PeerID({self})"

    def short(self) -> str:
        """The last 8 characters, enough to tell peers apart in log lines."""
        return str(self)[-8:]


# ---------------------------------------------------------------- keys and key files


def generate_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def peer_id_from_key(key: ed25519.Ed25519PrivateKey) -> PeerID:
    return PeerID.from_public_key(key.public_key())


def encode_private_key(key: ed25519.Ed25519PrivateKey) -> bytes:
    """libp2p's protobuf PrivateKey {Type: Ed25519, Data: seed || public key} (64 bytes of data)."""
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return encode_varint_field(1, KEY_TYPE_ED25519) + encode_len_field(2, seed + pub)


def decode_private_key(encoded: bytes) -> ed25519.Ed25519PrivateKey:
    key_type: int | None = None
    data: bytes | None = None
    for number, value in iter_fields(encoded):
        if number == 1 and isinstance(value, int):
            key_type = value
        elif number == 2 and isinstance(value, bytes):
            data = value
    if key_type != KEY_TYPE_ED25519 or data is None or len(data) not in (32, 64):
        raise ProtocolError("not an Ed25519 libp2p private key")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
    if (
        len(data) == 64
        and key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        != data[32:]
    ):
        raise ProtocolError("private key's stored public half does not match its seed")
    return key


def write_key_file(
    path: str | os.PathLike[str], key: ed25519.Ed25519PrivateKey, *, overwrite: bool = False
) -> None:
    """Write `key` to `path`, readable and writable by its owner only (mode 0600).

    The file is created with that mode from the start (no window where others could read it) and an
    existing file is refused unless `overwrite` is set, so a typo cannot destroy an identity.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"key file {target} already exists; refusing to overwrite an identity (remove it first "
            "or pass overwrite)"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {target}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        handle.write(encode_private_key(key))


def load_key_file(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """Load a key written by `write_key_file`; refuse files that group or others may read or write."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError as exc:
        raise KeyFileError(
            f"cannot open key file {target}: {exc.strerror}; create one with `peer keygen`"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {target} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {target} has mode {stat.S_IMODE(info.st_mode):o}: others may read this identity; "
                f"run `chmod 600 {target}` if it was never exposed, else make a new key"
            )
        data = handle.read(MAX_KEY_FILE_LENGTH + 1)
    if len(data) > MAX_KEY_FILE_LENGTH:
        raise KeyFileError(f"key file {target} is larger than {MAX_KEY_FILE_LENGTH} bytes; not a Shoal key")
    try:
        return decode_private_key(data)
    except ProtocolError as exc:
        raise KeyFileError(f"key file {target} does not hold an Ed25519 libp2p key: {exc}") from exc
