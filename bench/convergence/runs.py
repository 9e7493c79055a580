"""One benchmark run per method: simulated workers drive the same `gossip.outer` functions a peer calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

# Importing bench.convergence.research registers the research methods (diloco, sparseloco,
# gossip-sparseloco) into the dispatch of `shoal.gossip.outer.methods`, next to the product's.
from bench.convergence.research import diloco
from bench.convergence.research.gossip_sparseloco import known_ids, relay_for
from bench.convergence.sim import Batches, Replicas, SimConfig, evaluate, lr_at, spread
from shoal.gossip.outer.methods import TOPOLOGY, OuterConfig, OuterState, make_message, outer_step, wire_bytes
from shoal.gossip.outer.pairing import partner_index


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


def _guard(deadline: float) -> None:
    if time.time() > deadline:  # wall clock: the deadline crosses process boundaries
        raise OutOfTime


def run_synchronous(name: str, cfg: SimConfig, batches: Batches, init: dict, deadline: float) -> Result:
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
    )


def run_outer(
    name: str, cfg: SimConfig, batches: Batches, init: dict, outer: OuterConfig, deadline: float
) -> Result:
    """R workers, H inner AdamW steps, then every replica calls make_message / outer_step like a peer."""
    start = time.monotonic()
    r = cfg.replicas
    outer = replace(outer, n_peers=r)
    n_params = sum(t.numel() for t in init.values())
    reps = Replicas(cfg, init, r)
    states = [OuterState.fresh(f"{i:08d}", init) for i in range(r)]
    topology = TOPOLOGY[outer.method]
    sent_total = 0.0
    message_bits = 0.0
    curve = []
    step = 0
    for t in range(cfg.outer_steps):
        for _ in range(cfg.inner_steps):
            reps.inner_step(lr_at(cfg, step, cfg.total_steps), batches.x[step], batches.y[step])
            step += 1
        messages = [make_message(outer, states[i], reps.replica(i)) for i in range(r)]
        sizes = [wire_bytes(outer, m) for m in messages]
        message_bits += sum(sizes) * 8 / r / n_params
        received: list[list[bytes]] = [[] for _ in range(r)]
        if topology == "all":
            for i in range(r):
                received[i] = [m for j, m in enumerate(messages) if j != i]
            if outer.method == "diloco":  # a ring all-reduce of fp32 values, not r−1 copies
                sent_total += diloco.ring_allreduce_bytes(n_params, r)
            else:  # all-gather peer to peer: each peer sends its message to the r−1 others
                sent_total += (r - 1) * sum(sizes) / r
        else:
            partners = [partner_index(r, i, t, cfg.seed) for i in range(r)]
            if topology == "pair":
                for i, p in enumerate(partners):
                    if p is not None:
                        received[i] = [messages[p]]
                        sent_total += sizes[i] / r
            else:  # gossip: swap id sets, then send the partner what it lacks (own message included)
                known = [known_ids(s) for s in states]
                for i, p in enumerate(partners):
                    if p is not None:
                        relays = relay_for(outer, states[i], known[p])
                        received[p] = relays
                        sent_total += sum(wire_bytes(outer, m) for m in relays) / r
        new = [outer_step(outer, states[i], messages[i], received[i]) for i in range(r)]
        stacked = _stack(new)
        reps.load(stacked)
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
    )
