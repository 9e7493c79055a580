"""The one entry point the worker calls each round, for every outer method.

A round, for one peer (its slow weights φ, its fast weights θ after H inner steps):

    message = make_message(config, state, fast)          # bytes for the partner(s); updates EF in `state`
    ... the round protocol swaps messages (and, for gossip, relays: see `relay_for`) ...
    slow = outer_step(config, state, message, received)  # new φ, also stored in `state`; θ ← φ next

`received` is what arrived this round: for `diloco`/`sparseloco` the other peers' messages (all-reduce /
all-gather topology), for the pairwise methods the partner's one message (or none when sitting out), for
`gossip-sparseloco` the partner's relayed messages. Messages are parsed with limits (`wire.unpack`) and
checked against this peer's layout; a bad one raises `OuterMessageError` *before* anything touches φ, so a
round applies a whole validated update or none.

Methods (research notes 2.1–2.4):
* `diloco`             dense fp32 Δ, mean over peers, outer Nesterov SGD.
* `sparseloco`         EF + codec, contributor-mean over all peers, no outer momentum.
* `noloco`             pairwise modified Nesterov; sends θ in fp32 (β = γ form, one message each way).
* `gossip-sparseloco`  V-A: SparseLoCo messages disseminated by pairwise gossip, each applied once at lr/R.
* `pair-sparseloco`    V-B: partners apply the same contributor-mean of their two sparse messages, then pull
                       φ toward the pair mean on a rotating 1/F slice sent in `consensus_bits`.
* `compressed-noloco`  V-C: NoLoCo with θ sent as a modulo-lattice code relative to the receiver's φ.
                       The default (DEFAULT_METHOD): lowest loss of the three compositions at 3 bits/param,
                       O(1) bytes in the number of peers. Its code only decodes against a nearby φ, so a peer
                       that joins must first copy φ (and δ) from a partner (pitfall P13); a partner's step far
                       above this peer's own is refused (MAX_STEP_RATIO).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from shoal.gossip.outer import diloco, noloco, quant, sparseloco
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.tensors import (
    Named,
    OuterError,
    all_finite,
    check_same_layout,
    pseudo_gradient,
    zeros_like,
)
from shoal.gossip.outer.wire import Message, pack, unpack
from shoal.kernels.codec import CodecConfig, CodecError

log = logging.getLogger(__name__)

METHODS = ("diloco", "sparseloco", "noloco", "gossip-sparseloco", "pair-sparseloco", "compressed-noloco")
# Which peers each method's messages go to: every other peer, one partner, or one partner plus relays.
TOPOLOGY = {
    "diloco": "all",
    "sparseloco": "all",
    "noloco": "pair",
    "gossip-sparseloco": "gossip",
    "pair-sparseloco": "pair",
    "compressed-noloco": "pair",
}
SPARSE = {"sparseloco", "gossip-sparseloco", "pair-sparseloco"}
# Gossip keeps messages this many rounds for relaying: ≥ log2(R) rounds reach every peer of a random matching
# schedule with high probability at R ≤ 64 (notes 2.4 used 6); older ones are dropped, and refused on arrival.
DEFAULT_GOSSIP_TTL = 6
# Partners on the same data distribution and schedule move by similar amounts per round: a lattice step
# (V-C) more than this many times this peer's own is refused (pitfall P17: norm checks on what arrives).
MAX_STEP_RATIO = 16.0
MIN_STEP_ALLOWANCE = 1e-6  # tensors this peer did not move (zero Δ) still accept a small partner step
# Bound on the gossip store (messages kept for relaying): TTL rounds of up to this many origins each.
MAX_GOSSIP_ORIGINS = 1024


@dataclass(frozen=True)
class OuterConfig:
    """Every knob of every method; `OuterConfig.tuned(method)` gives the benchmark's tuned values."""

    method: str
    lr: float  # DiLoCo η, SparseLoCo α, NoLoCo β (outer lr)
    momentum: float = 0.0  # DiLoCo μ, NoLoCo α (outer momentum); unused by the sparse methods (P10)
    gamma: float = 0.7  # V-B consensus pull (NoLoCo's γ)
    ef_beta: float = sparseloco.DEFAULT_EF_BETA
    codec: CodecConfig | None = None  # None: the codec's defaults
    n_peers: int = 2  # V-A: updates are applied at lr / n_peers (linear rule, P4)
    consensus_every: int = 8  # V-B: F, the slice of each tensor pulled together per round is 1/F
    consensus_bits: int = 8
    # V-B consensus code: "absmax" (block absmax of φ: error ∝ the weights) or "lattice" (modulo code of φ
    # read against the receiver's own φ: error ∝ the step, sized to cover consensus_range · max|Δ|).
    consensus_code: str = "absmax"
    consensus_range: float = 1.5
    lattice_bits: int = 8  # V-C
    lattice_range: float = 3.0  # V-C: the lattice covers ± lattice_range · max|Δ| around the receiver's φ
    gossip_ttl: int = DEFAULT_GOSSIP_TTL

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OuterError(f"unknown outer method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.consensus_code not in ("absmax", "lattice"):
            raise OuterError(f"consensus_code must be 'absmax' or 'lattice', got {self.consensus_code!r}")
        if self.n_peers < 1 or self.consensus_every < 1 or self.gossip_ttl < 1:
            raise OuterError("n_peers, consensus_every and gossip_ttl must be >= 1")

    @classmethod
    def tuned(cls, method: str, **overrides: object) -> OuterConfig:
        """The values `python -m bench.convergence --sweep` picked at the CI size (see TUNED)."""
        return replace(cls(method=method, **TUNED[method]), **overrides)  # type: ignore[arg-type]


# Tuned by `python -m bench.convergence --sweep` at the CI size (d=64, L=2, R=4, H=12, N=480, seed 0); losses
# (nats/byte) of the values tried, best first. One seed moves the loss by ~0.03, so close calls are noise.
TUNED: dict[str, dict] = {
    "diloco": {"lr": diloco.DEFAULT_LR, "momentum": diloco.DEFAULT_MOMENTUM},  # η 0.3: 2.332; 0.4: 2.346
    "sparseloco": {"lr": sparseloco.DEFAULT_LR},  # top-k 64/4096: 2.273; 128/4096: 2.298
    "noloco": {
        "lr": noloco.DEFAULT_BETA,
        "momentum": noloco.DEFAULT_ALPHA,
    },  # β 0.7: 2.283; 0.9: 2.284; 0.5: 2.317
    "gossip-sparseloco": {"lr": 1.75},  # 1.75: 2.443; 2.5: 2.474; 3.5: 2.546
    # F=2: 2.369 (4.5 bits/param); F=1: 2.369 (8.7); F=8: 2.425 (1.3); 4-bit lattice consensus F=2: 2.507
    "pair-sparseloco": {"lr": 1.0, "consensus_every": 2},
    # lattice bits/range: 8/3: 2.289; 4/3: 2.293; 3/3: 2.298; 4/1.5: 2.367; 3/1.5: 2.368; 2/3: 2.518 (wraps)
    "compressed-noloco": {"lr": noloco.DEFAULT_BETA, "momentum": noloco.DEFAULT_ALPHA, "lattice_bits": 3},
}
# The composition with the lowest measured loss, ties within 1 % to the fewest bytes (bench.convergence).
DEFAULT_METHOD = "compressed-noloco"


@dataclass
class OuterState:
    """What one peer keeps between rounds for its outer method (all of it belongs in a checkpoint, P20)."""

    origin: str  # this peer's id (names its gossip messages)
    slow: Named  # φ
    error: Named  # EF buffer (sparse methods), fp32
    momentum: Named  # DiLoCo m / NoLoCo δ, fp32
    round: int = 0
    # Gossip (V-A): message id -> (round it was first seen, packed message) for relaying, and ids applied.
    store: dict[tuple[str, int], bytes] = field(default_factory=dict)

    @classmethod
    def fresh(cls, origin: str, slow: Mapping[str, torch.Tensor], round_: int = 0) -> OuterState:
        slow32 = {n: t.detach().float().clone() for n, t in slow.items()}
        return cls(origin, slow32, zeros_like(slow32), zeros_like(slow32), round_)

    def state_dict(self) -> dict:
        """Everything a resumed peer needs for its outer method (P20), as tensors and plain values."""
        return {
            "origin": self.origin,
            "round": self.round,
            "slow": {n: t.clone() for n, t in self.slow.items()},
            "error": {n: t.clone() for n, t in self.error.items()},
            "momentum": {n: t.clone() for n, t in self.momentum.items()},
            "store": [[origin, rnd, msg] for (origin, rnd), msg in sorted(self.store.items())],
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
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OuterError(f"outer state in checkpoint is incomplete or malformed: {exc!r}") from exc
        check_same_layout(state.slow, state.error, "checkpointed error feedback")
        check_same_layout(state.slow, state.momentum, "checkpointed outer momentum")
        return state


def _dense_tensors(named: Mapping[str, torch.Tensor]) -> list[bytes]:
    return [named[n].detach().float().contiguous().numpy().tobytes() for n in sorted(named)]


def _read_dense(message: Message, like: Mapping[str, torch.Tensor]) -> Named:
    names = sorted(like)
    if len(message.tensors) != len(names):
        raise OuterMessageError(
            f"message from {message.origin} has {len(message.tensors)} tensors, model has {len(names)}"
        )
    out: Named = {}
    for name, raw in zip(names, message.tensors, strict=True):
        shape = like[name].shape
        if len(raw) != 4 * like[name].numel():
            raise OuterMessageError(
                f"message from {message.origin}: tensor {name!r} has {len(raw)} bytes, "
                f"expected {4 * like[name].numel()} for shape {tuple(shape)}"
            )
        out[name] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(shape)
    if not all_finite(out):
        raise OuterMessageError(f"message from {message.origin} carries non-finite values; dropped")
    return out


def _consensus_slice(numel: int, round_: int, every: int) -> slice:
    """The rotating 1/F slice of a flat tensor pulled together this round (strided: spreads over rows)."""
    return slice(round_ % every, numel, every)


def make_message(config: OuterConfig, state: OuterState, fast: Mapping[str, torch.Tensor]) -> bytes:
    """This peer's message for the round. Sparse methods fold Δ into the EF buffer (state.error changes)."""
    delta = pseudo_gradient(state.slow, fast)
    method = config.method
    msg = Message(method, state.origin, state.round)
    if method == "diloco":
        msg.tensors = _dense_tensors(delta)
    elif method == "noloco":
        msg.tensors = _dense_tensors(fast)
    elif method in SPARSE:
        msg.update, state.error = sparseloco.compress(delta, state.error, config.codec, config.ef_beta)
        if method == "pair-sparseloco":
            scales, codes = [], []
            for name in sorted(state.slow):
                part = state.slow[name].reshape(-1)[
                    _consensus_slice(state.slow[name].numel(), state.round, config.consensus_every)
                ]
                if config.consensus_code == "lattice":
                    d = delta[name].reshape(-1)[
                        _consensus_slice(delta[name].numel(), state.round, config.consensus_every)
                    ]
                    reach = config.consensus_range * (float(d.abs().max()) if d.numel() else 0.0) + 1e-12
                    step = reach / 2 ** (config.consensus_bits - 1)
                    s = torch.tensor([step], dtype=torch.float32)
                    q = quant.lattice_encode(part, step, config.consensus_bits)
                else:
                    s, q = quant.absmax_encode(part, config.consensus_bits)
                scales.append(s.numpy().tobytes())
                codes.append(q.numpy().tobytes())
            msg.consensus = {"s": scales, "q": codes}
    elif method == "compressed-noloco":
        steps, codes = [], []
        for name in sorted(state.slow):
            reach = config.lattice_range * float(delta[name].abs().max()) + 1e-12
            step = 2 * reach / 2**config.lattice_bits
            steps.append(step)
            code = quant.lattice_encode(fast[name].float(), step, config.lattice_bits)
            codes.append(quant.pack_codes(code, config.lattice_bits))  # b bits per value on the wire
        msg.tensors, msg.steps = codes, steps
    packed = pack(msg)
    if method == "gossip-sparseloco":
        state.store[msg.id] = packed
    return packed


def wire_bytes(config: OuterConfig, message: bytes) -> int:
    """Bytes this message would take with codes bit-packed: the figure a real link carries.

    V-B's consensus codes are held one per byte in the message; the wire size counts them at their bit
    width. Everything else (V-C's lattice codes are packed already) is counted as is.
    """
    if config.method == "pair-sparseloco" and config.consensus_bits < 8:
        msg = unpack(message, config.method)
        n = sum(len(q) for q in (msg.consensus or {}).get("q", []))
        return len(message) - n + quant.packed_bits(n, config.consensus_bits)
    return len(message)


def known_ids(state: OuterState) -> set[tuple[str, int]]:
    """Gossip: ids of the messages this peer holds (what it tells its partner before the relay)."""
    return set(state.store)


def relay_for(config: OuterConfig, state: OuterState, partner_known: set[tuple[str, int]]) -> list[bytes]:
    """Gossip: the stored messages the partner lacks (younger than the TTL), to send it this round."""
    return [
        m
        for mid, m in sorted(state.store.items())
        if mid not in partner_known and mid[1] > state.round - config.gossip_ttl
    ]


def outer_step(config: OuterConfig, state: OuterState, own: bytes, received: Sequence[bytes]) -> Named:
    """Combine this peer's own message with what arrived; returns (and stores) the new slow weights φ.

    Every received message is parsed and validated before any weight changes; OuterMessageError otherwise.
    The round counter advances, so the next `make_message` belongs to the next round.
    """
    method = config.method
    mine = unpack(own, method)
    theirs = [unpack(m, method) for m in received]
    slow = state.slow
    if method == "diloco":
        deltas = [_read_dense(m, slow) for m in [mine, *theirs]]
        mean = {n: sum(d[n] for d in deltas) / len(deltas) for n in slow}
        state.slow, state.momentum = diloco.nesterov_step(
            slow, mean, state.momentum, config.lr, config.momentum
        )
    elif method == "noloco":
        if len(theirs) > 1:
            raise OuterMessageError(f"noloco pairs with one partner, got {len(theirs)} messages")
        fast = _read_dense(mine, slow)
        partner = _read_dense(theirs[0], slow) if theirs else None
        state.slow, state.momentum = noloco.noloco_step_from_fast(
            slow, fast, state.momentum, partner, config.momentum, config.lr
        )
    elif method == "compressed-noloco":
        if len(theirs) > 1:
            raise OuterMessageError(f"compressed-noloco pairs with one partner, got {len(theirs)} messages")
        fast = _read_lattice(mine, slow, config)
        if theirs:
            _check_steps(theirs[0], mine.steps)
        partner = _read_lattice(theirs[0], slow, config) if theirs else None
        state.slow, state.momentum = noloco.noloco_step_from_fast(
            slow, fast, state.momentum, partner, config.momentum, config.lr
        )
    elif method == "sparseloco":
        decoded = [_decode_sparse(m, slow) for m in [mine, *theirs]]
        state.slow = sparseloco.apply(slow, sparseloco.contributor_mean(decoded), config.lr)
    elif method == "pair-sparseloco":
        state.slow = _pair_sparse_step(config, state, mine, theirs)
    elif method == "gossip-sparseloco":
        state.slow = _gossip_step(config, state, mine, theirs, received)
    state.round += 1
    return state.slow


def _decode_sparse(message: Message, slow: Mapping[str, torch.Tensor]) -> tuple[Named, Named]:
    """The codec payload of a sparse method's message as dense (values, contributor mask)."""
    if message.update is None:
        raise OuterMessageError(f"{message.kind} message from {message.origin} carries no codec payload")
    try:
        return sparseloco.decode_dense(message.update, slow)
    except CodecError as exc:
        raise OuterMessageError(f"{message.kind} message from {message.origin}: {exc}") from exc


def _check_steps(message: Message, own_steps: Sequence[float]) -> None:
    """Refuse lattice steps far above this peer's own (pitfall P17).

    A step is the sender's claim of how far it moved; a decoded value lands within 2^(b-1) steps of the
    receiver's φ, so the step bounds how far one message can pull.
    """
    for name_index, (theirs, ours) in enumerate(zip(message.steps, own_steps, strict=False)):
        if theirs > MAX_STEP_RATIO * ours + MIN_STEP_ALLOWANCE:
            raise OuterMessageError(
                f"{message.kind} message from {message.origin}: lattice step {theirs:.3g} of tensor "
                f"#{name_index} is over {MAX_STEP_RATIO}x this peer's {ours:.3g}; dropped as implausible"
            )


def _read_lattice(message: Message, slow: Mapping[str, torch.Tensor], config: OuterConfig) -> Named:
    """V-C: θ of the sender, decoded with this peer's φ as side information."""
    names = sorted(slow)
    if len(message.tensors) != len(names) or len(message.steps) != len(names):
        raise OuterMessageError(
            f"compressed-noloco message from {message.origin} does not match the model's tensors"
        )
    out: Named = {}
    for name, raw, step in zip(names, message.tensors, message.steps, strict=True):
        count = slow[name].numel()
        if len(raw) != quant.packed_bits(count, config.lattice_bits) or not step > 0 or not np.isfinite(step):
            raise OuterMessageError(f"compressed-noloco message from {message.origin}: bad code for {name!r}")
        codes = quant.unpack_codes(raw, count, config.lattice_bits)
        out[name] = quant.lattice_decode(codes, step, slow[name].float(), config.lattice_bits)
    return out


def _pair_sparse_step(config: OuterConfig, state: OuterState, mine: Message, theirs: list[Message]) -> Named:
    """V-B: φ ← φ − α·contributor-mean(own, partner); then the consensus pull on this round's slice."""
    if len(theirs) > 1:
        raise OuterMessageError(f"pair-sparseloco pairs with one partner, got {len(theirs)} messages")
    slow = state.slow
    decoded = [_decode_sparse(m, slow) for m in [mine, *theirs]]
    partner_slices: dict[str, torch.Tensor] = {}
    if theirs:
        cons = theirs[0].consensus or {}
        scales, codes = cons.get("s", []), cons.get("q", [])
        names = sorted(slow)
        if len(scales) != len(names) or len(codes) != len(names):
            raise OuterMessageError(
                f"pair-sparseloco message from {theirs[0].origin} lacks a consensus slice"
            )
        for name, s_raw, q_raw in zip(names, scales, codes, strict=True):
            sl = _consensus_slice(slow[name].numel(), state.round, config.consensus_every)
            n = len(range(*sl.indices(slow[name].numel())))
            lattice = config.consensus_code == "lattice"
            n_scales = 1 if lattice else (n + quant.BLOCK - 1) // quant.BLOCK
            if len(q_raw) != n or len(s_raw) != 4 * n_scales:
                raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has the wrong size")
            s = torch.from_numpy(np.frombuffer(s_raw, dtype=np.float32).copy())
            q = torch.from_numpy(np.frombuffer(q_raw, dtype=np.uint8).copy())
            if not lattice:
                partner_slices[name] = quant.absmax_decode(s, q, config.consensus_bits)
                continue
            step = float(s[0])
            if not (step > 0 and np.isfinite(step)):
                raise OuterMessageError(f"pair-sparseloco consensus for {name!r} has step {step}")
            own = slow[name].reshape(-1)[sl].float()
            other = quant.lattice_decode(q, step, own, config.consensus_bits)
            # Near the edge of the lattice's reach a value may have wrapped: pull only where it cannot have.
            trusted = (other - own).abs() < 0.75 * step * 2 ** (config.consensus_bits - 1)
            partner_slices[name] = torch.where(trusted, other, own)
        if not all_finite(partner_slices):
            raise OuterMessageError(f"pair-sparseloco consensus from {theirs[0].origin} is not finite")
    new = sparseloco.apply(slow, sparseloco.contributor_mean(decoded), config.lr)
    for name, other in partner_slices.items():
        sl = _consensus_slice(slow[name].numel(), state.round, config.consensus_every)
        flat = new[name].reshape(-1)
        own_old = slow[name].reshape(-1)[sl]
        # Pull toward the pair mean of the pre-update φ; both sides applied the same sparse update U.
        flat[sl] -= config.gamma * (own_old - (own_old + other) / 2)
    return new


def _gossip_step(
    config: OuterConfig, state: OuterState, mine: Message, theirs: list[Message], raw: Sequence[bytes]
) -> Named:
    """V-A: apply own + every message not applied before, each once, at lr / n_peers; keep them to relay."""
    slow = state.slow
    fresh: list[tuple[Message, bytes]] = []
    oldest = state.round - config.gossip_ttl
    for msg, packed in zip(theirs, raw, strict=True):
        if msg.id in state.store or msg.round <= oldest or msg.round > state.round:
            continue  # seen, too old to dedup safely, or from the future: drop
        fresh.append((msg, packed))
    decoded = [_decode_sparse(m, slow)[0] for m in [mine] + [m for m, _ in fresh]]
    scale = config.lr / config.n_peers
    new = {n: phi.float().clone() for n, phi in slow.items()}
    for values in decoded:
        for n in new:
            new[n] -= scale * values[n]
    for msg, packed in fresh:
        state.store[msg.id] = packed
    # Forget what is past the TTL (bounded store); refuse to grow past the origin cap.
    state.store = {mid: m for mid, m in state.store.items() if mid[1] > oldest + 1}
    if len(state.store) > config.gossip_ttl * MAX_GOSSIP_ORIGINS:
        raise OuterError(f"gossip store holds {len(state.store)} messages, over the cap; too many origins")
    return new


def check_layout(state: OuterState, fast: Mapping[str, torch.Tensor]) -> None:
    check_same_layout(state.slow, fast, "fast weights")
