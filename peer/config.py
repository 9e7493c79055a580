"""One validated configuration object per peer, from a TOML file and command-line overrides.

Every field can be set in the `[peer]` table of a TOML file (`--config FILE`) and on the command line;
the command line wins. Defaults run on a CPU-only laptop.
"""

from __future__ import annotations

import dataclasses
import glob
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.gossip.admission import TokenError, from_text
from shoal.peer.worker.presets import PRESETS
from shoal.transport.identity_work import MAX_BITS

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ShoalError):
    """A configuration value is missing, malformed or out of range."""


# Test-only hostile behaviours the daemon plays (`behave`): "silent" keeps its signed heartbeats (and the
# run-state and membership gossip) going but never answers a partner's status or offer, nor offers itself;
# "made_up_weights" trains and swaps as usual but serves joiners (and probes) noise of its weights' norm.
DAEMON_BEHAVIOURS = ("silent", "made_up_weights")


@dataclass(frozen=True)
class PeerConfig:
    run_id: str
    bootstrap: tuple[str, ...] = ()
    listen: str = "/ip4/0.0.0.0/tcp/0"
    data: str | None = None  # a text file or folder to train on; None: the Python standard library
    state_dir: str | None = None  # key, checkpoint and control socket; None: ./runs/<run>/<peer>
    key: str | None = None  # the peer's key file (peer keygen); None: the state dir's, or a new one
    # Admission (gossip/admission.py): the creator of a closed run sets `closed`; the others join with the
    # token `peer token` printed for them. Open runs (neither) take any peer.
    closed: bool = False
    token: str | None = None
    # Bits of identity work (transport/identity_work.py) every member proves, the same in the whole run: a
    # volunteer pays about 2^bits hashes once per key (20: a second or two), an attacker per identity.
    identity_bits: int = 20
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
    eval_windows: int | None = None  # None: EVAL_TOKENS' worth of the model's windows (peer/worker/train.py)
    seed: int = 0
    threads: int = 0  # torch CPU threads in the worker; 0: torch's default
    # The outer method (gossip/outer): "default" is the one bench/convergence chose; its tuned values apply.
    method: str = "default"
    # Train the next round while this one is swapped (peer/worker/overlap.py): no training time lost to the
    # link or the outer step, for the partner's part of each step landing one round late. "on", "off", or
    # "auto": while swaps are long for the model (overlap.Policy).
    overlap: str = "auto"
    # Recompute each block's activations during backward instead of keeping them: "auto" does it where one
    # micro-batch's activations would exceed the model and half a GiB (gpt2-small: 2 models less for about
    # a quarter more compute), "on" and "off" always and never.
    activation_checkpointing: str = "auto"
    # Network
    exchange_timeout: float = 30.0  # seconds a peer waits for its partner in one round
    gossip_interval: float = 1.0
    fail_after: float = 5.0  # a member silent this long is presumed dead
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint; None: off
    # NATs (transport/nat). A public peer may serve relaying and STUN for NATed ones; a NATed peer
    # reserves a slot on each relay and punches holes with the help of STUN (and TURN for ICE).
    relays: tuple[str, ...] = ()  # multiaddrs of relays; /p2p/ID may be left out
    stun: tuple[str, ...] = ()  # HOST:PORT of STUN servers (two at different IPs spot a symmetric NAT)
    turn: tuple[str, ...] = ()  # HOST:PORT:USER:PASSWORD of TURN servers, for ICE
    serve_relay: bool = False
    serve_stun: int | None = None  # a port: answer STUN over UDP and TCP there
    punch: bool = True  # replace a relayed path by a punched one when possible
    # Test-only (the live Byzantine benchmark): this peer's worker plays a hostile partner, one of
    # gossip/outer/byzantine.py ATTACKS, or its daemon one of DAEMON_BEHAVIOURS. Hidden from --help; never
    # set on a real peer.
    behave: str | None = None

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
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        for name in ("lr", "exchange_timeout", "gossip_interval", "fail_after"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"shard {self.shard[0]}/{self.shard[1]} must satisfy 0 <= index < count")
        if (
            self.data is not None
            and not Path(self.data).expanduser().exists()
            and not glob.has_magic(self.data)
        ):
            raise ConfigError(
                f"data path {self.data} does not exist; pass a text file, a folder, a quoted glob, token "
                "files or a saved Hugging Face dataset"
            )
        for address in self.bootstrap:
            _check_bootstrap(address)
        if self.closed and self.bootstrap:
            raise ConfigError(
                "--closed is for the run's creator (the first peer, started without --bootstrap); the "
                "others join a closed run with --token"
            )
        if self.token is not None:
            _check_token(self.token, self.run_id)
        if not 0 <= self.identity_bits <= MAX_BITS:
            raise ConfigError(f"identity_bits must be 0..{MAX_BITS}, got {self.identity_bits}")
        for relay in self.relays:
            if not re.fullmatch(r"/(ip4|ip6|dns4|dns6|dns)/[^/]+/tcp/\d+(/p2p/[^/]+)?/?", relay):
                raise ConfigError(f"relay {relay!r} must look like /ip4/HOST/tcp/PORT[/p2p/ID]")
        for server in self.stun:
            _host_port(server, "STUN server")
        for server in self.turn:
            parts = server.split(":", 3)
            if len(parts) != 4 or not all(parts):
                raise ConfigError(f"TURN server {server!r} must look like HOST:PORT:USER:PASSWORD")
            _host_port(":".join(parts[:2]), "TURN server")
        if self.behave is not None and not re.fullmatch(r"[a-z_]{1,32}", self.behave):
            raise ConfigError(f"behave {self.behave!r} is not an attack name")  # the worker knows the list
        if self.activation_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(
                f"activation_checkpointing must be auto, on or off, got {self.activation_checkpointing!r}"
            )
        if self.overlap not in ("auto", "on", "off"):
            raise ConfigError(f"overlap must be auto, on or off, got {self.overlap!r}")
        if self.serve_stun is not None and not 0 <= self.serve_stun < 65536:
            raise ConfigError(f"serve_stun must be a port number, got {self.serve_stun}")

    def worker_dict(self) -> dict[str, Any]:
        """The fields the training worker needs, as plain values for the control channel."""
        names = (
            *("model", "inner_steps", "batch_size", "lr", "warmup_steps", "total_steps", "weight_decay"),
            *("eval_windows", "seed", "threads", "method", "data", "rounds", "behave", "overlap"),
            "activation_checkpointing",
        )
        values = {name: getattr(self, name) for name in names}
        if self.behave in DAEMON_BEHAVIOURS:  # the daemon plays it; the worker trains as usual
            values["behave"] = None
        values["shard"] = list(self.shard) if self.shard else None
        return values

    def nat_config(self, relays: tuple[Any, ...]) -> Any:
        """The NAT layer's settings; `relays` are the relay multiaddrs with their peer ids resolved."""
        from shoal.transport.nat.paths import NatConfig

        return NatConfig(
            relays=relays,
            stun_servers=tuple(_host_port(s, "STUN server") for s in self.stun),
            serve_stun_port=self.serve_stun,
            serve_relay=self.serve_relay,
            punch=self.punch,
            turn_servers=tuple(_turn_server(t) for t in self.turn),
        )


def _check_bootstrap(text: str) -> None:
    """A bootstrap address must be a TCP multiaddr (its /p2p/ id, when given, a valid peer id): checked
    before anything starts, so that a typo fails at once instead of after the bootstrap patience."""
    from shoal.transport.identity import PeerID
    from shoal.transport.multiaddr import Multiaddr

    form = "/ip4/HOST/tcp/PORT/p2p/ID (as the run's first peer printed it; /p2p/ID may be left out)"
    if re.fullmatch(r"\[?[^\[\]/\s]+\]?:\d+", text.strip()):
        host, port = text.strip().rsplit(":", 1)
        kind = "ip6" if ":" in host else "ip4" if re.fullmatch(r"[\d.]+", host) else "dns"
        raise ConfigError(
            f"bootstrap address {text!r} is not a multiaddr; "
            f"write it as /{kind}/{host.strip('[]')}/tcp/{port}"
        )
    try:
        addr = Multiaddr.parse(text)
        addr.tcp_endpoint()
        for name, value in addr.parts[2:]:
            if name not in ("p2p", "p2p-circuit"):
                raise ValueError(f"/{name} has no place after the TCP port")
            if name == "p2p":
                PeerID.from_string(value)
    except (ShoalError, ValueError) as error:
        raise ConfigError(f"bootstrap address {text!r} cannot be read ({error}); expected {form}") from error


def _host_port(text: str, what: str) -> tuple[str, int]:
    match = re.fullmatch(r"([^:\s]+):(\d+)", text.strip())
    if match is None or not 0 < int(match[2]) < 65536:
        raise ConfigError(f"{what} {text!r} must look like HOST:PORT")
    return match[1], int(match[2])


def _turn_server(text: str) -> tuple[str, int, str, str]:
    """HOST:PORT:USER:PASSWORD (checked by PeerConfig) as (host, port, user, password)."""
    host, port, user, password = text.split(":", 3)
    return (*_host_port(f"{host}:{port}", "TURN server"), user, password)


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
    for name in ("bootstrap", "relays", "stun", "turn"):  # TOML gives a list or one string
        if isinstance(values.get(name), list | str):
            values[name] = tuple([values[name]] if isinstance(values[name], str) else values[name])
    try:
        return PeerConfig(**values)
    except TypeError as error:
        raise ConfigError(f"bad configuration: {error}") from error


def _check_token(text: str, run_id: str) -> None:
    try:
        token = from_text(text)
    except TokenError as error:
        raise ConfigError(str(error)) from error
    if token.run != run_id:
        raise ConfigError(f"the join token is for run {token.run!r}, not {run_id!r}")
    if token.expires <= time.time():
        raise ConfigError("the join token has expired; ask the run's creator for a new one")
