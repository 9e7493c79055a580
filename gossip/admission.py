"""Join tokens: who may be a member of a closed run.

Open runs (the default) take anyone who signs its own membership entry. A run started with `--closed`
takes only peers whose entry carries a token signed by the run's creator, for that peer (`--for ID`) or
for anyone who holds it (`--any`, a bearer token: keep it secret), until the token expires. A token is
self-contained: every member checks it against the creator's key, inlined in the creator's peer id, with
no traffic and no central list. A member whose token expires drops out of everyone's view at its next
heartbeat; the creator issues a new token and the peer restarts with it.

Text form: `shoal-token-1.` + base64url(msgpack [run, creator, subject, expires, nonce, signature]),
where the signature is the creator's Ed25519 signature of msgpack
["shoal-token/1", run, creator, subject, expires, nonce]; subject is a peer id or "*"; expires is Unix
seconds.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.errors import ShoalError
from shoal.transport.identity import PeerID, peer_id_from_key

PREFIX = "shoal-token-1."
SIGNING_DOMAIN = "shoal-token/1"
ANYONE = "*"
MAX_TOKEN_BYTES = 512  # the packed form; a peer id is at most ~50 characters
NONCE_BYTES = 8  # two tokens for the same peer and expiry still differ (and can be told apart in logs)


class TokenError(ShoalError):
    """A join token that cannot be read, is not for this run or peer, or has expired."""


@dataclass(frozen=True)
class JoinToken:
    run: str
    creator: str
    subject: str  # a peer id, or ANYONE
    expires: int  # Unix seconds
    nonce: bytes
    signature: bytes

    def signed_part(self) -> bytes:
        return msgpack.packb([SIGNING_DOMAIN, self.run, self.creator, self.subject, self.expires, self.nonce])

    def packed(self) -> bytes:
        return msgpack.packb([self.run, self.creator, self.subject, self.expires, self.nonce, self.signature])

    def text(self) -> str:
        return PREFIX + base64.urlsafe_b64encode(self.packed()).decode().rstrip("=")

    def check(self, run: str, creator: str, peer_id: str, now: float) -> str | None:
        """Why this token does not admit `peer_id` to `run` now (None: it does)."""
        if self.run != run:
            return f"the token is for run {self.run!r}, not {run!r}"
        if self.creator != creator:
            return f"the token was signed by {self.creator}, not by the run's creator {creator}"
        if self.subject not in (ANYONE, peer_id):
            return f"the token is for peer {self.subject}, not {peer_id}"
        if now >= self.expires:
            return f"the token expired {int(now - self.expires)} s ago"
        try:
            key = PeerID.from_string(self.creator).public_key()
        except ValueError:
            key = None
        if key is None or not key.verify(self.signature, self.signed_part()):
            return "the token's signature does not check against the creator's key"
        return None


def issue(creator_key: ed25519.Ed25519PrivateKey, run: str, subject: str, expires: int) -> JoinToken:
    """A token signed by the run's creator for `subject` (a peer id or ANYONE) until `expires`."""
    if subject != ANYONE:
        PeerID.from_string(subject)  # raises ValueError for anything that is not a peer id
    unsigned = JoinToken(
        run, str(peer_id_from_key(creator_key)), subject, expires, os.urandom(NONCE_BYTES), b""
    )
    return JoinToken(
        unsigned.run,
        unsigned.creator,
        subject,
        expires,
        unsigned.nonce,
        creator_key.sign(unsigned.signed_part()),
    )


def from_text(text: str) -> JoinToken:
    """Parses a token as `peer token` printed it."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"a join token starts with {PREFIX!r}; copy the whole line `peer token` printed")
    body = text[len(PREFIX) :]
    if len(body) > MAX_TOKEN_BYTES * 2:
        raise TokenError("the join token is too long to be one")
    try:
        packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as error:
        raise TokenError(
            "the join token is not valid base64; copy the whole line `peer token` printed"
        ) from error
    token = from_packed(packed)
    if token is None:
        raise TokenError("the join token is damaged; copy the whole line `peer token` printed")
    return token


def from_packed(packed: object) -> JoinToken | None:
    """A token from its packed form as it travels in membership entries; None if malformed."""
    if not isinstance(packed, bytes) or len(packed) > MAX_TOKEN_BYTES:
        return None
    try:
        fields = msgpack.unpackb(packed, raw=False, max_str_len=256, max_bin_len=128, max_array_len=8)
    except (ValueError, msgpack.UnpackException, TypeError):
        return None
    if not (isinstance(fields, list) and len(fields) == 6):
        return None
    run, creator, subject, expires, nonce, signature = fields
    if not all(isinstance(v, str) for v in (run, creator, subject)):
        return None
    if not (isinstance(expires, int) and not isinstance(expires, bool) and 0 < expires < 2**40):
        return None
    if not (isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES):
        return None
    if not (isinstance(signature, bytes) and len(signature) == 64):
        return None
    return JoinToken(run, creator, subject, expires, nonce, signature)


class Admission:
    """A closed run's door: checks the tokens members carry (each peer's token verified once)."""

    def __init__(self, run: str, creator: str) -> None:
        self.run = run
        self.creator = creator
        self._verified: dict[tuple[str, bytes], int] = {}  # (peer id, packed token) -> expiry

    def refuses(self, peer_id: str, packed: object, now: float) -> str | None:
        """Why `peer_id` with this packed token is not a member (None: it is). The creator needs none."""
        if peer_id == self.creator:
            return None
        if packed is None:
            return "no join token"
        if not isinstance(packed, bytes):
            return "a malformed join token"
        expires = self._verified.get((peer_id, packed))
        if expires is not None:
            return None if now < expires else "an expired join token"
        token = from_packed(packed)
        if token is None:
            return "a malformed join token"
        why = token.check(self.run, self.creator, peer_id, now)
        if why is None:
            if len(self._verified) >= 4096:  # bounded: forget the oldest verification
                self._verified.pop(next(iter(self._verified)))
            self._verified[(peer_id, packed)] = token.expires
        return why
