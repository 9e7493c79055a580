"""One benchmark run per method: simulated workers drive the same `gossip.outer` functions a peer calls.

A partner message that `outer_step` refuses (OuterMessageError) skips that pair's exchange for the round: both
partners step alone, as peers do when a swap fails (docs/run-protocol.md), and the run counts it. For the
lattice code (compressed-noloco) every partner decode is also compared with the partner's true θ: the rate of
values that wrapped, of values in blocks the receiver flagged and did not apply, of wraps it missed, and the
decode error against the signal |θ_partner − φ_receiver|.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

# Importing bench.convergence.research registers the research methods (diloco, sparseloco,
# gossip-sparseloco) into the dispatch of `shoal.gossip.outer.methods`, next to the product's.
from bench.convergence.research import diloco
from bench.convergence.research.gossip_sparseloco import known_ids, relay_for
from bench.convergence.sim import Batches, Replicas, SimConfig, evaluate, lr_at, spread
from shoal.gossip.outer import compressed_noloco
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.methods import TOPOLOGY, OuterConfig, OuterState, make_message, outer_step, wire_bytes
from shoal.gossip.outer.pairing import partner_index
from shoal.gossip.outer.wire import unpack


@dataclass
class Result:
    name: str
    eval_loss: float  # mean over replicas of each replica's held-out loss
    eval_loss_avg_weights: float  # held-out loss of the replicas' averaged weights
    spread: float
    bytes_per_peer_per_round: float
    bits_per_param: float  # one message's encoded size (bits) per parameter; 0 for methods without one
    seconds: float
    tok_per_s: float
    curve: list[dict] = field(default_factory=list)  # {"tokens", "bytes", "loss"} at eval points
    peers: int = 0  # R
    skipped_pairs: int = 0  # pair exchanges skipped because a partner message was refused
    decode: dict | None = None  # lattice methods: DecodeStats.summary()

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "name"}


class OutOfTime(Exception):
    """The benchmark's wall-clock guard fired inside a run."""


def _stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _point(
    reps: Replicas, stacked: dict[str, torch.Tensor], batches: Batches, tokens: int, sent: float
) -> dict:
    losses = evaluate(reps, stacked, batches)
    return {"tokens": tokens, "bytes": sent, "loss": sum(losses) / len(losses)}


def _guard(deadline: float | None) -> None:
    if deadline is not None and time.time() > deadline:  # wall clock: the deadline crosses processes
        raise OutOfTime


@dataclass
class DecodeStats:
    """Partner decodes of a lattice code against the truth, summed over the run's exchanges."""

    values: int = 0  # partner values decoded
    wrapped: int = 0  # decoded to a wrong lattice point (|decoded − true| > one step)
    flagged: int = 0  # in blocks whose check failed: not applied
    missed: int = 0  # wrapped but not flagged (applied wrong)
    error_sq: float = 0.0  # Σ (decoded − true)² over the applied values
    signal_sq: float = 0.0  # Σ (true − φ_receiver)² over the same values
    worst_round_flagged: float = 0.0  # the largest per-round fraction of flagged values

    def add(self, config: OuterConfig, message: bytes, slow: dict, true_fast: dict) -> None:
        try:
            msg = unpack(message, config.method)
            decoded = compressed_noloco.read_lattice(msg, slow, config)
        except OuterMessageError:
            return  # refused: a skipped pair, counted there
        for name, step in zip(sorted(slow), msg.steps, strict=True):
            true, got, flag = true_fast[name].float(), decoded.values[name], decoded.wrapped[name]
            wrong = (got - true).abs() > step
            self.values += true.numel()
            self.wrapped += int(wrong.sum())
            self.flagged += int(flag.sum())
            self.missed += int((wrong & ~flag).sum())
            self.error_sq += float((got - true).masked_fill(flag, 0.0).pow(2).sum())
            self.signal_sq += float((true - slow[name].float()).masked_fill(flag, 0.0).pow(2).sum())

    def summary(self) -> dict:
        n = max(1, self.values)
        return {
            "wrap_rate": self.wrapped / n,
            "flagged_rate": self.flagged / n,
            "missed_wrap_rate": self.missed / n,
            "error_signal": math.sqrt(self.error_sq / self.signal_sq) if self.signal_sq > 0 else 0.0,
            "worst_round_flagged_rate": self.worst_round_flagged,
        }


def run_synchronous(
    name: str, cfg: SimConfig, batches: Batches, init: dict, deadline: float | None = None
) -> Result:
    """`single` (one worker, R·N steps of batch B) or `ddp` (R workers, gradient all-reduce every step)."""
    start = time.monotonic()
    r = cfg.replicas
    n_params = sum(t.numel() for t in init.values())
    if name == "single":
        reps = Replicas(cfg, init, 1)
        total = cfg.total_steps * r
        per_round = 0.0
    else:
        reps = Replicas(cfg, init, r)
        total = cfg.total_steps
        per_round = cfg.inner_steps * diloco.ring_allreduce_bytes(n_params, r)
    curve = []
    every = cfg.eval_every * cfg.inner_steps * (r if name == "single" else 1)
    for step in range(total):
        if name == "single":  # the same windows, one worker: step s reads worker s mod R's batch
            x, y = batches.x[step // r, step % r][None], batches.y[step // r, step % r][None]
            reps.inner_step(lr_at(cfg, step, total), x, y)
        else:
            reps.inner_step(lr_at(cfg, step, total), batches.x[step], batches.y[step], all_reduce=True)
        if (step + 1) % every == 0 or step + 1 == total:
            _guard(deadline)
            tokens = (step + 1) * cfg.batch * cfg.model.block_size * (1 if name == "single" else r)
            rounds = tokens / (cfg.tokens_per_step * cfg.inner_steps)
            curve.append(
                _point(
                    reps, {k: p.detach() for k, p in reps.params.items()}, batches, tokens, per_round * rounds
                )
            )
    final = {k: p.detach() for k, p in reps.params.items()}
    losses = evaluate(reps, final, batches)
    secs = time.monotonic() - start
    return Result(
        name,
        sum(losses) / len(losses),
        losses[0],
        0.0,
        per_round,
        32.0 if name == "ddp" else 0.0,
        secs,
        cfg.total_steps * cfg.tokens_per_step / secs,
        curve,
        peers=r,
    )


def _snapshot(state: OuterState) -> tuple:
    # outer_step rebinds φ, the momentum and the error buffer (new tensors); it edits only the dicts copied.
    return (state.slow, state.momentum, state.error, state.round, dict(state.drift), dict(state.counters))


def _restore(state: OuterState, saved: tuple) -> None:
    state.slow, state.momentum, state.error, state.round, state.drift, state.counters = saved


def exchange_pairs(
    outer: OuterConfig, states: list[OuterState], messages: list[bytes], partners: list[int | None]
) -> int:
    """Every peer's outer step with its partner's message; a refused message skips the pair (both alone).

    Returns the number of pairs skipped. A peer whose `outer_step` refuses has changed nothing; its partner,
    which may have stepped already, is put back, and both step without a partner message.
    """
    skipped = 0
    for i, p in enumerate(partners):
        if p is None:
            outer_step(outer, states[i], messages[i], [])
            continue
        if p < i:
            continue  # stepped with its partner
        saved = _snapshot(states[i]), _snapshot(states[p])
        try:
            outer_step(outer, states[i], messages[i], [messages[p]])
            outer_step(outer, states[p], messages[p], [messages[i]])
        except OuterMessageError:
            skipped += 1
            for peer, before in zip((i, p), saved, strict=True):
                _restore(states[peer], before)
                outer_step(outer, states[peer], messages[peer], [])
    return skipped


@dataclass
class Pending:
    """An overlapped round: the states before it, its messages and pairs, and the φ each peer trained from."""

    saved: list[tuple]
    messages: list[bytes]
    partners: list[int | None]
    alone: list[dict[str, torch.Tensor]]


def step_alone(
    outer: OuterConfig, states: list[OuterState], messages: list[bytes], partners: list[int | None]
) -> Pending:
    """Overlap: every peer steps with its own message only (what it can do before the partner's arrives)
    and trains the next round from there; the exchange is settled a round later (`settle`)."""
    saved = [_snapshot(s) for s in states]
    for i in range(len(states)):
        outer_step(outer, states[i], messages[i], [])
    return Pending(saved, messages, partners, [s.slow for s in states])


@torch.no_grad()
def settle(outer: OuterConfig, reps: Replicas, states: list[OuterState], pending: Pending | None) -> int:
    """The overlapped round's real outer step (with the partner's message, as `exchange_pairs`), and its
    difference from the step taken alone added to the fast weights trained meanwhile. Skipped pairs."""
    if pending is None:
        return 0
    alone = [s.slow for s in states]
    assert all(a is b for a, b in zip(alone, pending.alone, strict=True)), "settled out of order"
    for state, before in zip(states, pending.saved, strict=True):
        _restore(state, before)
    skipped = exchange_pairs(outer, states, pending.messages, pending.partners)
    for name, p in reps.params.items():
        pairs = zip(states, alone, strict=True)
        fix = torch.stack([s.slow[name].float() - a[name].float() for s, a in pairs])
        p.add_(fix.to(p.dtype))
    return skipped


def run_outer(
    name: str,
    cfg: SimConfig,
    batches: Batches,
    init: dict,
    outer: OuterConfig,
    deadline: float | None = None,
) -> Result:
    """R workers, H inner AdamW steps, then every replica calls make_message / outer_step like a peer."""
    start = time.monotonic()
    r = cfg.replicas
    outer = replace(outer, n_peers=r)
    n_params = sum(t.numel() for t in init.values())
    reps = Replicas(cfg, init, r)
    states = [OuterState.fresh(f"{i:08d}", init) for i in range(r)]
    topology = TOPOLOGY[outer.method]
    lattice = outer.method == "compressed-noloco"
    stats = DecodeStats()
    skipped = 0
    sent_total = 0.0
    message_bits = 0.0
    curve = []
    step = 0
    pending: Pending | None = None  # overlap: the last round's exchange, whose partner part is still due
    for t in range(cfg.outer_steps):
        for _ in range(cfg.inner_steps):
            reps.inner_step(lr_at(cfg, step, cfg.total_steps), batches.x[step], batches.y[step])
            step += 1
        skipped += settle(outer, reps, states, pending)  # overlap: last round's partner part, before θ goes
        pending = None
        fast = [reps.replica(i) for i in range(r)]
        messages = [make_message(outer, states[i], fast[i]) for i in range(r)]
        sizes = [wire_bytes(outer, m) for m in messages]
        message_bits += sum(sizes) * 8 / r / n_params
        received: list[list[bytes]] = [[] for _ in range(r)]
        if topology == "pair":
            partners = [partner_index(r, i, t, cfg.seed) for i in range(r)]
            flagged_before = stats.flagged
            values_before = stats.values
            for i, p in enumerate(partners):
                if p is not None:
                    sent_total += sizes[i] / r
                    if lattice:
                        stats.add(outer, messages[p], states[i].slow, fast[p])
            if stats.values > values_before:
                stats.worst_round_flagged = max(
                    stats.worst_round_flagged,
                    (stats.flagged - flagged_before) / (stats.values - values_before),
                )
            if outer.overlap:
                pending = step_alone(outer, states, messages, partners)
            else:
                skipped += exchange_pairs(outer, states, messages, partners)
        else:
            if topology == "all":
                for i in range(r):
                    received[i] = [m for j, m in enumerate(messages) if j != i]
                if outer.method == "diloco":  # a ring all-reduce of fp32 values, not r−1 copies
                    sent_total += diloco.ring_allreduce_bytes(n_params, r)
                else:  # all-gather peer to peer: each peer sends its message to the r−1 others
                    sent_total += (r - 1) * sum(sizes) / r
            else:  # gossip: swap id sets, then send the partner what it lacks (own message included)
                known = [known_ids(s) for s in states]
                for i in range(r):
                    p = partner_index(r, i, t, cfg.seed)
                    if p is not None:
                        relays = relay_for(outer, states[i], known[p])
                        received[p] = relays
                        sent_total += sum(wire_bytes(outer, m) for m in relays) / r
            for i in range(r):
                outer_step(outer, states[i], messages[i], received[i])
        stacked = _stack([s.slow for s in states])
        reps.load(stacked)
        if pending is not None and t + 1 == cfg.outer_steps:  # the last round's partner part lands too
            skipped += settle(outer, reps, states, pending)
            pending = None
            stacked = _stack([s.slow for s in states])
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.outer_steps:
            _guard(deadline)
            curve.append(_point(reps, stacked, batches, step * cfg.tokens_per_step, sent_total))
    final = _stack([s.slow for s in states])
    losses = evaluate(reps, final, batches)
    avg = evaluate(reps, {k: v.mean(0, keepdim=True) for k, v in final.items()}, batches)[0]
    secs = time.monotonic() - start
    rounds = cfg.outer_steps
    return Result(
        name,
        sum(losses) / len(losses),
        avg,
        spread(final),
        sent_total / rounds,
        message_bits / rounds,
        secs,
        cfg.total_steps * cfg.tokens_per_step / secs,
        curve,
        peers=r,
        skipped_pairs=skipped,
        decode=stats.summary() if lattice else None,
    )
