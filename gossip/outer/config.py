"""What every outer method shares: its config, the state one peer keeps, and the table of known methods.

`OuterConfig` holds every knob of every method, `OuterState` what a peer keeps between rounds. MODULES maps a
method's name to its module (see `methods` for the interface), TOPOLOGY to the peers its messages go to,
TUNED to its tuned knobs; `register` fills all three. Import these through `methods`, which registers the
product's methods; bench/convergence/research registers the research variants the same way. The method
modules import this one for their types, so it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType

import torch

from shoal.gossip.outer import sparseloco
from shoal.gossip.outer.tensors import Named, OuterError, check_same_layout, zeros_like
from shoal.kernels.codec import CodecConfig

# Method name -> its module (make_message, outer_step, wire_bytes): what `methods` dispatches through.
MODULES: dict[str, ModuleType] = {}
# Which peers a method's messages go to: every other peer, one partner, or one partner plus relays.
TOPOLOGIES = ("all", "pair", "gossip")
TOPOLOGY: dict[str, str] = {}
# A method's knobs as `python -m bench.convergence --sweep` tuned them (`OuterConfig.tuned`).
TUNED: dict[str, dict] = {}
INTERFACE = ("make_message", "outer_step", "wire_bytes")


@dataclass(frozen=True)
class OuterConfig:
    """Every knob of every method; `OuterConfig.tuned(method)` gives the benchmark's tuned values."""

    method: str
    lr: float  # NoLoCo β, SparseLoCo α (outer lr); DiLoCo η
    momentum: float = 0.0  # NoLoCo α (outer momentum), DiLoCo μ; unused by the sparse methods (P10)
    gamma: float = 0.7  # V-B consensus pull (NoLoCo's γ)
    ef_beta: float = sparseloco.DEFAULT_EF_BETA
    codec: CodecConfig | None = None  # None: the codec's defaults
    n_peers: int = 2  # V-A (research): updates are applied at lr / n_peers (linear rule, P4)
    consensus_every: int = 8  # V-B: F, the slice of each tensor pulled together per round is 1/F
    consensus_bits: int = 8
    # V-B consensus code: "absmax" (block absmax of φ: error ∝ the weights) or "lattice" (modulo code of φ
    # read against the receiver's own φ: error ∝ the step, sized to cover consensus_range · max|Δ|).
    consensus_code: str = "absmax"
    consensus_range: float = 1.5
    lattice_bits: int = 8  # V-C
    lattice_range: float = 3.0  # V-C: the lattice covers ± lattice_range · max|Δ| around the receiver's φ
    # V-C: > 0 also covers lattice_drift × the replica distance this peer measured in its recent decodes
    # (OuterState.drift); 0 sizes the step from the own update alone.
    lattice_drift: float = 0.0
    gossip_ttl: int = 6  # V-A (research): rounds a message is kept for relaying
    # Pairwise methods: the next round trains from this peer's own outer step while the exchange runs, and
    # the partner's part of the step reaches the fast weights one round late (bench.convergence measures
    # what that costs; the live worker does not do it yet).
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.method not in MODULES:
            raise OuterError(f"unknown outer method {self.method!r}; choose one of {', '.join(MODULES)}")
        if self.consensus_code not in ("absmax", "lattice"):
            raise OuterError(f"consensus_code must be 'absmax' or 'lattice', got {self.consensus_code!r}")
        if self.n_peers < 1 or self.consensus_every < 1 or self.gossip_ttl < 1:
            raise OuterError("n_peers, consensus_every and gossip_ttl must be >= 1")
        if not (self.lattice_range > 0 and self.lattice_drift >= 0):
            raise OuterError("lattice_range must be > 0 and lattice_drift >= 0")

    @classmethod
    def tuned(cls, method: str, **overrides: object) -> OuterConfig:
        """The values `python -m bench.convergence --sweep` picked at the CI size (see TUNED)."""
        if method not in TUNED:
            raise OuterError(f"unknown outer method {method!r}; choose one of {', '.join(MODULES)}")
        return replace(cls(method=method, **TUNED[method]), **overrides)  # type: ignore[arg-type]


def register(name: str, module: ModuleType, topology: str, tuned: Mapping[str, object]) -> None:
    """Add an outer method to the dispatch: `methods` adds the product's, bench/convergence/research the rest.

    `module` provides INTERFACE (see `methods`); `tuned` are its `OuterConfig.tuned` values.
    `methods.METHODS`, the product's list, is left alone: the worker offers only its pairwise methods.
    """
    missing = [f for f in INTERFACE if not callable(getattr(module, f, None))]
    if missing:
        raise OuterError(f"outer method module {module.__name__} lacks {', '.join(missing)}")
    if topology not in TOPOLOGIES:
        raise OuterError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    if MODULES.get(name, module) is not module:
        raise OuterError(f"outer method {name!r} is registered already, by {MODULES[name].__name__}")
    MODULES[name] = module
    TOPOLOGY[name] = topology
    TUNED[name] = dict(tuned)


@dataclass
class OuterState:
    """What one peer keeps between rounds for its outer method (all of it belongs in a checkpoint, P20)."""

    origin: str  # this peer's id (names its gossip messages)
    slow: Named  # φ
    error: Named  # EF buffer (sparse methods), fp32; empty for the methods that keep none
    momentum: Named  # DiLoCo m / NoLoCo δ, fp32
    round: int = 0
    # Messages kept for relaying, by id (origin, round): only the gossip research variant (V-A, bench) fills
    # it; empty for the product's pairwise methods, and kept in the checkpoint either way.
    store: dict[tuple[str, int], bytes] = field(default_factory=dict)
    # V-C: per tensor, the running largest distance |θ_partner − φ| seen in correct decodes (sizes the next
    # lattice step when OuterConfig.lattice_drift > 0), and counts of decoded and of wrapped lattice values.
    drift: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fresh(
        cls, origin: str, slow: Mapping[str, torch.Tensor], round_: int = 0, error_feedback: bool = True
    ) -> OuterState:
        """φ from `slow`, zero momentum, and a zero EF buffer unless `error_feedback` is False (a method
        that keeps none: the dense NoLoCo methods; a model's worth of memory saved)."""
        slow32 = {n: t.detach().float().clone() for n, t in slow.items()}
        error = zeros_like(slow32) if error_feedback else {}
        return cls(origin, slow32, error, zeros_like(slow32), round_)

    def state_dict(self, clone: bool = True) -> dict:
        """Everything a resumed peer needs for its outer method (P20), as tensors and plain values.

        `clone=False` hands out this state's own tensors: the outer steps never write into them (each step
        makes new ones), so a checkpoint written in the background may hold them while training goes on,
        without three models' worth of copies."""
        own: Callable[[torch.Tensor], torch.Tensor] = torch.clone if clone else _same
        return {
            "origin": self.origin,
            "round": self.round,
            "slow": {n: own(t) for n, t in self.slow.items()},
            "error": {n: own(t) for n, t in self.error.items()},
            "momentum": {n: own(t) for n, t in self.momentum.items()},
            "store": [[origin, rnd, msg] for (origin, rnd), msg in sorted(self.store.items())],
            "drift": dict(self.drift),
            "counters": dict(self.counters),
        }

    @classmethod
    def from_state_dict(cls, saved: Mapping) -> OuterState:
        """Inverse of `state_dict`; raises OuterError if the buffers do not match the slow weights."""
        try:
            slow = {n: t.clone() for n, t in saved["slow"].items()}
            state = cls(
                str(saved["origin"]),
                slow,
                {n: t.clone() for n, t in saved["error"].items()},
                {n: t.clone() for n, t in saved["momentum"].items()},
                int(saved["round"]),
            )
            state.store = {(str(o), int(r)): bytes(m) for o, r, m in saved.get("store", [])}
            state.drift = {str(n): float(v) for n, v in saved.get("drift", {}).items()}
            state.counters = {str(n): int(v) for n, v in saved.get("counters", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OuterError(f"outer state in checkpoint is incomplete or malformed: {exc!r}") from exc
        if state.error:  # empty: a method that keeps no EF buffer
            check_same_layout(state.slow, state.error, "checkpointed error feedback")
        check_same_layout(state.slow, state.momentum, "checkpointed outer momentum")
        return state


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
