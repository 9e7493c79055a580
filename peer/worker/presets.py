"""Model sizes a run can name, without importing torch (the daemon and the CLI read these too)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 64  # context length
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes a run can ask for by name; "tiny" is the CPU default.
PRESETS: dict[str, GPTConfig] = {
    "nano": GPTConfig(n_layer=2, n_head=2, n_embd=64),  # 0.12 M, the convergence benchmark's CI size
    "tiny": GPTConfig(),  # 0.44 M
    "small": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=192),  # 1.8 M
    "base": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),  # 10.7 M
    "gpt2-small": GPTConfig(vocab_size=256, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # ~86 M
}


def peer_number(text: str, modulo: int) -> int:
    """A number derived from a peer's id (its default data shard, its initial seed), the same everywhere."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % modulo
