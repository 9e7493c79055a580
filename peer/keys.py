"""Which identity a peer runs under: its Ed25519 key, its PeerID, and the state directory that goes with it.

In order: the key file named with `--key`; the `key` file in `--state-dir` (a restarted peer keeps its
identity); otherwise a new key, written (mode 0600) into the state directory, which defaults to
`./runs/RUN/PEER-ID`.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.peer.config import ConfigError, PeerConfig
from shoal.transport.identity import generate_key, load_key_file, peer_id_from_key, write_key_file

KEY_FILE = "key"


def resolve_identity(config: PeerConfig) -> tuple[ed25519.Ed25519PrivateKey, str, Path]:
    if config.key:
        key = load_key_file(config.key)
    elif config.state_dir and (Path(config.state_dir) / KEY_FILE).exists():
        key = load_key_file(Path(config.state_dir) / KEY_FILE)
    else:
        key = None
    created = key is None
    if key is None:
        key = generate_key()
    peer_id = str(peer_id_from_key(key))
    state_dir = Path(config.state_dir or Path("runs") / config.run_id / peer_id)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the state directory {state_dir}: {error.strerror or error}; "
            "choose another --state-dir"
        ) from error
    if created:
        write_key_file(state_dir / KEY_FILE, key)
    return key, peer_id, state_dir
