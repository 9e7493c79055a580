"""Noise XX_25519_ChaChaPoly_SHA256 with libp2p's handshake payload, sans-I/O.

Specs: the Noise Protocol Framework rev. 34 (https://noiseprotocol.org/noise.html) and libp2p's
noise spec (https://github.com/libp2p/specs/blob/master/noise/README.md). Every Noise message travels
with a 2-byte big-endian length prefix. The pattern is

    -> e
    <- e, ee, s, es      + responder's payload (identity key, signature over its Noise static key)
    -> s, se             + initiator's payload

After message 2 the initiator knows who answered and refuses a peer id other than the one it dialed;
after message 3 the responder knows the initiator. `NoiseHandshake.transport()` then gives the
`NoiseTransport` that encrypts and decrypts the session's frames.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import DecryptError, HandshakeError, PeerIDMismatchError, ProtocolError
from .identity import PeerID, PublicKey, encode_public_key
from .protobuf import encode_len_field, iter_fields

PROTOCOL_ID = "/noise"
PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
HASHLEN = 32
DHLEN = 32
TAGLEN = 16
# Noise caps every message at 65535 bytes (spec section 3); the 2-byte length prefix cannot say more.
MAX_FRAME_LENGTH = 65535
MAX_PLAINTEXT_LENGTH = MAX_FRAME_LENGTH - TAGLEN
# Muxers kept from a peer's early-negotiation list; real peers offer one or two.
MAX_MUXERS = 8
# Noise's nonce is 64 bits and must never repeat; 2**64 - 1 is reserved (spec section 5.1).
MAX_NONCE = 2**64 - 1

_LENGTH = struct.Struct(">H")
_NONCE_PREFIX = b"\0\0\0\0"


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """HKDF with two outputs, as Noise section 4.3 defines it on top of HMAC-SHA256."""
    temp = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


def _nonce(n: int) -> bytes:
    return _NONCE_PREFIX + n.to_bytes(8, "little")


class _CipherState:
    def __init__(self, key: bytes | None = None) -> None:
        self.cipher = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.cipher is None:
            return plaintext
        out = self.cipher.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.cipher is None:
            return ciphertext
        try:
            out = self.cipher.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag as exc:
            raise HandshakeError("Noise handshake message failed authentication") from exc
        self.n += 1
        return out


class _SymmetricState:
    def __init__(self) -> None:
        self.h = PROTOCOL_NAME.ljust(HASHLEN, b"\0")  # the name is exactly 32 bytes: no hashing
        self.ck = self.h
        self.cipher = _CipherState()
        self.mix_hash(b"")  # empty prologue

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher = _CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


def _x25519_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dh(private: x25519.X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # all-zero shared secret: a low-order point chosen by a hostile peer
        raise HandshakeError("peer's Noise key yields a degenerate Diffie-Hellman result") from exc


def encode_payload(
    identity_key: ed25519.Ed25519PrivateKey, static_public: bytes, muxers: Sequence[str] = ()
) -> bytes:
    """libp2p NoiseHandshakePayload {identity_key = 1, identity_sig = 2, extensions = 4}.

    The extensions carry our stream muxers (NoiseExtensions.stream_muxers = 2) for the early muxer
    negotiation of libp2p's connections spec ("inlined muxer negotiation").
    """
    signature = identity_key.sign(SIGNATURE_PREFIX + static_public)
    payload = encode_len_field(1, encode_public_key(identity_key.public_key())) + encode_len_field(
        2, signature
    )
    if muxers:
        payload += encode_len_field(4, b"".join(encode_len_field(2, m.encode()) for m in muxers))
    return payload


def verify_payload(payload: bytes, remote_static: bytes) -> tuple[PublicKey, list[str]]:
    """Check the peer's payload: its identity key signed its Noise static key.

    Returns that identity and the stream muxers it offered (empty when it sent no extensions).
    """
    key_bytes: bytes | None = None
    signature: bytes | None = None
    muxers: list[str] = []
    for number, value in iter_fields(payload):
        if number == 1 and isinstance(value, bytes):
            key_bytes = value
        elif number == 2 and isinstance(value, bytes):
            signature = value
        elif number == 4 and isinstance(value, bytes):
            for ext_number, ext_value in iter_fields(value):
                if ext_number == 2 and isinstance(ext_value, bytes) and len(muxers) < MAX_MUXERS:
                    muxers.append(ext_value.decode(errors="replace"))
    if key_bytes is None or signature is None:
        raise HandshakeError("Noise handshake payload lacks the identity key or its signature")
    key = PublicKey.from_protobuf(key_bytes)
    if not key.verify(signature, SIGNATURE_PREFIX + remote_static):
        raise HandshakeError("peer's identity key did not sign its Noise static key: refusing the peer")
    return key, muxers


class NoiseStatic:
    """A host's long-lived Noise static key with its signed handshake payload, computed once.

    libp2p lets a host keep one static key for all its connections; signing it once saves a key
    generation and a signature per connection. Fresh ephemeral keys still give every session new keys.
    """

    def __init__(self, identity_key: ed25519.Ed25519PrivateKey, muxers: Sequence[str] = ()) -> None:
        self.identity_key = identity_key
        self.muxers = list(muxers)
        self.key = x25519.X25519PrivateKey.generate()
        self.public = _x25519_public(self.key)
        self.payload = encode_payload(identity_key, self.public, self.muxers)


class NoiseHandshake:
    """The XX handshake for one connection. Feed bytes with `receive_data`, send `data_to_send()`."""

    def __init__(
        self,
        *,
        initiator: bool,
        identity_key: ed25519.Ed25519PrivateKey,
        expected_peer: PeerID | None = None,
        muxers: Sequence[str] = (),
        static: NoiseStatic | None = None,
    ) -> None:
        self.initiator = initiator
        if static is None or static.identity_key is not identity_key or static.muxers != list(muxers):
            static = NoiseStatic(identity_key, muxers)
        self._static = static
        self._muxers = static.muxers
        self.remote_muxers: list[str] = []
        self._expected = expected_peer
        self._s = static.key
        self._e = x25519.X25519PrivateKey.generate()
        self._re = b""
        self._rs = b""
        self._sym = _SymmetricState()
        self._buffer = bytearray()
        self._out = bytearray()
        self._step = 0  # messages processed so far (sent or received): 3 means done
        self.remote_public_key: PublicKey | None = None
        self.remote_peer_id: PeerID | None = None
        self.unused_data = b""
        if initiator:
            self._write_message_1()

    @property
    def done(self) -> bool:
        return self._step == 3

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.done:
            self.unused_data += data
            return
        self._buffer += data
        while not self.done and len(self._buffer) >= 2:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < 2 + length:
                return
            message = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            self._read_message(message)
        if self.done:
            self.unused_data = bytes(self._buffer)
            self._buffer.clear()

    @property
    def selected_muxer(self) -> str | None:
        """The muxer agreed inside the handshake, or None to negotiate it with multistream-select.

        Per libp2p's inlined muxer negotiation: the first muxer of the initiator's list that the
        responder also offers; only when both sides sent a list.
        """
        if not self.done or not self._muxers or not self.remote_muxers:
            return None
        initiator_list, responder_list = (
            (self._muxers, self.remote_muxers) if self.initiator else (self.remote_muxers, self._muxers)
        )
        return next((m for m in initiator_list if m in responder_list), None)

    def transport(self) -> NoiseTransport:
        if not self.done:
            raise RuntimeError("the Noise handshake is not finished")
        k1, k2 = self._sym.split()
        send, recv = (k1, k2) if self.initiator else (k2, k1)
        return NoiseTransport(send, recv)

    # ------------------------------------------------------------------ the three messages

    def _emit(self, message: bytes) -> None:
        self._out += _LENGTH.pack(len(message)) + message
        self._step += 1

    def _write_message_1(self) -> None:  # -> e
        e_pub = _x25519_public(self._e)
        self._sym.mix_hash(e_pub)
        self._emit(e_pub + self._sym.encrypt_and_hash(b""))

    def _read_message(self, message: bytes) -> None:
        if self.initiator and self._step == 1:
            self._read_message_2(message)
            self._write_message_3()
        elif not self.initiator and self._step == 0:
            self._read_message_1(message)
            self._write_message_2()
        elif not self.initiator and self._step == 2:
            self._read_message_3(message)
        else:  # pragma: no cover - the loop stops at done, so this is a logic error
            raise HandshakeError(f"unexpected Noise message at step {self._step}")

    def _read_message_1(self, message: bytes) -> None:  # responder: <- e
        if len(message) < DHLEN:
            raise HandshakeError(f"Noise message 1 is {len(message)} bytes, shorter than a public key")
        self._re = message[:DHLEN]
        self._sym.mix_hash(self._re)
        self._sym.decrypt_and_hash(message[DHLEN:])  # libp2p sends an empty payload here
        self._step += 1

    def _write_message_2(self) -> None:  # responder: -> e, ee, s, es, payload
        e_pub = _x25519_public(self._e)
        self._sym.mix_hash(e_pub)
        self._sym.mix_key(_dh(self._e, self._re))
        encrypted_s = self._sym.encrypt_and_hash(self._static.public)
        self._sym.mix_key(_dh(self._s, self._re))
        payload = self._sym.encrypt_and_hash(self._static.payload)
        self._emit(e_pub + encrypted_s + payload)

    def _read_message_2(self, message: bytes) -> None:  # initiator: <- e, ee, s, es, payload
        if len(message) < DHLEN + DHLEN + TAGLEN + TAGLEN:
            raise HandshakeError(f"Noise message 2 is {len(message)} bytes, too short")
        self._re = message[:DHLEN]
        self._sym.mix_hash(self._re)
        self._sym.mix_key(_dh(self._e, self._re))
        self._rs = self._sym.decrypt_and_hash(message[DHLEN : 2 * DHLEN + TAGLEN])
        self._sym.mix_key(_dh(self._e, self._rs))
        payload = self._sym.decrypt_and_hash(message[2 * DHLEN + TAGLEN :])
        self._accept_identity(*verify_payload(payload, self._rs))
        self._step += 1

    def _write_message_3(self) -> None:  # initiator: -> s, se, payload
        encrypted_s = self._sym.encrypt_and_hash(self._static.public)
        self._sym.mix_key(_dh(self._s, self._re))
        payload = self._sym.encrypt_and_hash(self._static.payload)
        self._emit(encrypted_s + payload)

    def _read_message_3(self, message: bytes) -> None:  # responder: <- s, se, payload
        if len(message) < DHLEN + TAGLEN + TAGLEN:
            raise HandshakeError(f"Noise message 3 is {len(message)} bytes, too short")
        self._rs = self._sym.decrypt_and_hash(message[: DHLEN + TAGLEN])
        self._sym.mix_key(_dh(self._e, self._rs))
        payload = self._sym.decrypt_and_hash(message[DHLEN + TAGLEN :])
        self._accept_identity(*verify_payload(payload, self._rs))
        self._step += 1

    def _accept_identity(self, key: PublicKey, muxers: list[str]) -> None:
        self.remote_muxers = muxers
        peer_id = key.peer_id()
        if self._expected is not None and peer_id != self._expected:
            raise PeerIDMismatchError(
                f"dialed peer {self._expected} but the remote proved identity {peer_id}; "
                "the address is stale or someone is impersonating the peer"
            )
        self.remote_public_key = key
        self.remote_peer_id = peer_id


class NoiseTransport:
    """The session after the handshake: frames plaintext out, authenticates and decrypts frames in.

    Hot path of every byte Shoal sends: one AEAD call per 64 KiB frame and no other copy.
    """

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self._partial = bytearray()  # the start of a frame whose rest has not arrived yet

    def encrypt(self, plaintext: bytes | bytearray | memoryview, out: list[bytes]) -> None:
        """Append one framed, encrypted message to `out`: its 2-byte length, then ciphertext and tag.

        Two list items rather than one joined buffer: the socket's writev gathers them, so the 64 KiB
        ciphertext is never copied in Python.
        """
        size = len(plaintext)
        if size > MAX_PLAINTEXT_LENGTH:
            raise ValueError(f"Noise frame plaintext of {size} bytes exceeds {MAX_PLAINTEXT_LENGTH}")
        if self._send_n >= MAX_NONCE:
            raise ProtocolError("Noise send nonce exhausted; the connection must be re-established")
        out.append(_LENGTH.pack(size + TAGLEN))
        out.append(self._send.encrypt(_nonce(self._send_n), plaintext, None))
        self._send_n += 1

    def encrypt_frame(self, plaintext: bytes) -> bytes:
        """One framed message as a single bytes object (for the handshake-time negotiation)."""
        out: list[bytes] = []
        self.encrypt(plaintext, out)
        return b"".join(out)

    def receive_data(self, data: bytes) -> list[bytes]:
        """Decrypt every whole frame received so far; keep a partial frame for the next call.

        Only a frame split across two reads is copied (to join its halves); the rest is decrypted
        straight from the received buffer.
        """
        out: list[bytes] = []
        view = memoryview(data)
        end = len(data)
        pos = 0
        partial = self._partial
        if partial:
            if len(partial) < 2:
                take = min(2 - len(partial), end)
                partial += view[:take]
                pos = take
                if len(partial) < 2:
                    return out
            (length,) = _LENGTH.unpack_from(partial)
            take = min(2 + length - len(partial), end - pos)
            partial += view[pos : pos + take]
            pos += take
            if len(partial) < 2 + length:
                return out
            self._partial = bytearray()
            out.append(self._open(memoryview(partial)[2:], length))
        while end - pos >= 2:
            (length,) = _LENGTH.unpack_from(data, pos)
            if end - pos - 2 < length:
                break
            out.append(self._open(view[pos + 2 : pos + 2 + length], length))
            pos += 2 + length
        if pos < end:
            self._partial = bytearray(view[pos:])
        return out

    def decrypt_frames(self, view: memoryview) -> tuple[list[bytes], int]:
        """Decrypt the whole frames at the start of `view` (a driver's receive buffer).

        Returns the plaintexts and how many bytes they used; the caller keeps the rest for later.
        """
        if self._partial:
            raise RuntimeError("decrypt_frames after a partial receive_data: call take_partial() first")
        out: list[bytes] = []
        end = len(view)
        pos = 0
        while end - pos >= 2:
            length = view[pos] << 8 | view[pos + 1]
            if end - pos - 2 < length:
                break
            out.append(self._open(view[pos + 2 : pos + 2 + length], length))
            pos += 2 + length
        return out, pos

    def take_partial(self) -> bytes:
        """Hand the buffered start of an incomplete frame to a driver that buffers by itself."""
        partial = bytes(self._partial)
        self._partial = bytearray()
        return partial

    def _open(self, ciphertext: memoryview, length: int) -> bytes:
        if length < TAGLEN:
            raise DecryptError(f"Noise frame of {length} bytes is shorter than its tag")
        try:
            plaintext = self._recv.decrypt(_nonce(self._recv_n), ciphertext, None)
        except InvalidTag as exc:
            raise DecryptError(
                f"Noise frame {self._recv_n} failed authentication: the bytes were altered in transit"
            ) from exc
        self._recv_n += 1
        return plaintext
