"""What `peer token` needs besides the token itself: the creator's key file, and a duration in words."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.errors import ShoalError
from shoal.peer.keys import KEY_FILE
from shoal.transport.identity import load_key_file

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
MAX_DURATION_S = 10 * 365 * 86_400


class TokenCommandError(ShoalError):
    """`peer token` cannot find the creator's key or read its arguments."""


def parse_duration(text: str) -> int:
    """Seconds in "3600", "3600s", "90m", "12h", "30d" or "2w"."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if not match:
        raise TokenCommandError(f"cannot read the duration {text!r}; write e.g. 12h, 30d or 3600s")
    seconds = int(match.group(1)) * UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_DURATION_S:
        raise TokenCommandError(f"the duration {text!r} must be more than 0 s and at most 10 years")
    return seconds


def find_creator_key(
    run: str, key: str | None, state_dir: str | None
) -> tuple[ed25519.Ed25519PrivateKey, str]:
    """The run creator's key and where it was found: --key, --state-dir, or the one peer under ./runs/RUN."""
    if key:
        path = Path(key)
    elif state_dir:
        path = Path(state_dir) / KEY_FILE
    else:
        found = sorted(Path("runs", run).glob(f"*/{KEY_FILE}"))
        if len(found) != 1:
            where = "none" if not found else ", ".join(str(p) for p in found)
            raise TokenCommandError(
                f"found {len(found)} key files under runs/{run} ({where}); name the creator's with --key "
                "FILE or --state-dir DIR"
            )
        path = found[0]
    if not path.exists():
        raise TokenCommandError(f"no key file at {path}; name the run creator's with --key or --state-dir")
    return load_key_file(path), str(path)
