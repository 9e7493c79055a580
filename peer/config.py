"""One validated configuration object per peer, from a TOML file and command-line overrides.

Every field can be set in the `[peer]` table of a TOML file (`--config FILE`) and on the command line;
the command line wins. Defaults run on a CPU-only laptop.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.errors import ShoalError
from peer.worker.presets import PRESETS

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ShoalError):
    """A configuration value is missing, malformed or out of range."""


@dataclass(frozen=True)
class PeerConfig:
    run_id: str
    bootstrap: tuple[str, ...] = ()
    listen: str = "/ip4/0.0.0.0/tcp/0"
    data: str | None = None  # a text file or folder to train on; None: the Python standard library
    state_dir: str | None = None  # key, checkpoint and control socket; None: ./runs/<run>/<peer>
    key: str | None = None  # the peer's key file (peer keygen); None: the state dir's, or a new one
    rounds: int | None = None  # stop after this many outer rounds; None: train until stopped
    wait_peers: int = 1  # start round 1 only once this many peers (self included) are known, or after 60 s
    # Training (the worker)
    model: str = "tiny"
    inner_steps: int = 20  # H: inner AdamW steps per outer round
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 2000  # the cosine schedule's length in inner steps, when rounds is not given
    weight_decay: float = 0.1
    shard: tuple[int, int] | None = None  # (index, count); None: picked from the peer id among 16
    eval_windows: int = 64
    seed: int = 0
    threads: int = 0  # torch CPU threads in the worker; 0: torch's default
    # The outer method (gossip/outer): "default" is the one bench/convergence chose; its tuned values apply.
    method: str = "default"
    # Network
    exchange_timeout: float = 30.0  # seconds a peer waits for its partner in one round
    gossip_interval: float = 1.0
    fail_after: float = 5.0  # a member silent this long is presumed dead
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint; None: off

    def __post_init__(self) -> None:
        if not RUN_ID_PATTERN.match(self.run_id):
            raise ConfigError(
                f"run id {self.run_id!r} must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        if self.model not in PRESETS and not (self.model.startswith("hf:") and Path(self.model[3:]).is_dir()):
            raise ConfigError(
                f"unknown model {self.model!r}; choose one of {', '.join(PRESETS)}, "
                "or hf:PATH for a Hugging Face causal LM saved in a local folder"
            )
        for name in ("inner_steps", "batch_size", "eval_windows", "wait_peers", "total_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        for name in ("lr", "exchange_timeout", "gossip_interval", "fail_after"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"shard {self.shard[0]}/{self.shard[1]} must satisfy 0 <= index < count")
        if self.data is not None and not Path(self.data).exists():
            raise ConfigError(f"data path {self.data} does not exist")

    def worker_dict(self) -> dict[str, Any]:
        """The fields the training worker needs, as plain values for the control channel."""
        names = (
            *("model", "inner_steps", "batch_size", "lr", "warmup_steps", "total_steps", "weight_decay"),
            *("eval_windows", "seed", "threads", "method", "data", "rounds"),
        )
        values = {name: getattr(self, name) for name in names}
        values["shard"] = list(self.shard) if self.shard else None
        return values


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match:
        raise ConfigError(f"shard {text!r} must look like INDEX/COUNT, e.g. 0/4")
    return int(match[1]), int(match[2])


def load_config(path: str | None, overrides: dict[str, Any]) -> PeerConfig:
    """Reads the `[peer]` table of a TOML file, then applies command-line values that were given."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        values.update(document.get("peer", {}))
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    known = {f.name for f in dataclasses.fields(PeerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    if "run_id" not in values:
        raise ConfigError("a run id is required: --run ID or run_id in the [peer] table")
    if isinstance(values.get("shard"), str):
        values["shard"] = parse_shard(values["shard"])
    if isinstance(values.get("bootstrap"), list | str):
        values["bootstrap"] = tuple(
            [values["bootstrap"]] if isinstance(values["bootstrap"], str) else values["bootstrap"]
        )
    try:
        return PeerConfig(**values)
    except TypeError as error:
        raise ConfigError(f"bad configuration: {error}") from error
