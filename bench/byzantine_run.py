"""One run of the Byzantine benchmark: R simulated peers of `bench.convergence`, one of them hostile.

The same loop as `bench.convergence.runs.run_outer` for a pairwise method (the default, compressed-noloco),
with two changes: the attacker (replica `attacker`) sends `gossip.outer.byzantine.forge`'s message instead of
its honest one (its own outer step still uses its honest message, so that it stays close enough to the swarm
to keep attacking), and, when `guarded`, every honest receiver judges its partner's message with
`gossip.outer.guard.Guard` before its step and applies the verdict's weight. Unguarded runs are the product
as it is: the method's own checks (format, lattice step at most MAX_STEP_RATIO x this peer's) and, as in
`exchange_pairs`, a refused message skips the pair's exchange for both partners.

Guarded runs also keep the run's evidence as live peers publish it: each guard's local exclusions
(`RunState.accuse`) and each strike (`RunState.report_strike`), turned into the run's exclusions by the run
state's own rule (`gossip.runstate.evidence.run_exclusions`); an excluded peer is left out of the pairing
from the next round on, as live daemons leave it out.

Guarded refusals are one-sided: the receiver steps alone, the sender still pulls toward the receiver's θ
(docs/outer-methods.md, "The partner guard"). The loss probe evaluates φ_i, θ_i and the partner's decoded θ_p
on PROBE_WINDOWS fixed windows of receiver i's own training shard (one vmapped call for all receivers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from bench.convergence.runs import OutOfTime
from bench.convergence.sim import Batches, Replicas, SimConfig, evaluate, lr_at
from shoal.gossip.outer import byzantine, compressed_noloco, guarded_step
from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.guard import REFUSE, Guard, GuardConfig, Probe, Verdict
from shoal.gossip.outer.methods import OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.pairing import pairing, partner_index
from shoal.gossip.outer.wire import unpack
from shoal.gossip.runstate.evidence import note_strike, run_exclusions
from shoal.peer.worker.data import fixed_windows

PROBE_WINDOWS = 16  # per receiver: 1,024 bytes of its own shard, three forward passes each


def _stack(dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _snapshot(state: OuterState) -> tuple:
    return (state.slow, state.momentum, state.error, state.round, dict(state.drift), dict(state.counters))


def _restore(state: OuterState, saved: tuple) -> None:
    state.slow, state.momentum, state.error, state.round, state.drift, state.counters = saved


def step_alone(outer: OuterConfig, state: OuterState, own: bytes) -> None:
    outer_step(outer, state, own, [])


def weighted_step(outer: OuterConfig, state: OuterState, own: bytes, partner: bytes, weight: float) -> None:
    """The worker's guarded step (`guarded_step.weighted_step`: the partner's pull weighted by `weight` in
    one pass; 1: the method's step, 0: alone). A message the method refuses leaves the state as it was and
    steps alone."""
    try:
        guarded_step.weighted_step(outer, state, own, partner, weight)
    except OuterMessageError:
        step_alone(outer, state, own)


def product_exchange(
    outer: OuterConfig, states: list[OuterState], own: list[bytes], sent: list[bytes], partners: list
) -> set[int]:
    """The product today (`exchange_pairs` with the attacker's own/sent split): a refused message skips the
    pair for both. Returns the receivers whose partner's message was refused."""
    refused: set[int] = set()
    for i, p in enumerate(partners):
        if p is None:
            step_alone(outer, states[i], own[i])
            continue
        if p < i:
            continue
        saved = _snapshot(states[i]), _snapshot(states[p])
        try:
            try:
                outer_step(outer, states[i], own[i], [sent[p]])
            except OuterMessageError:
                refused.add(i)
                raise
            try:
                outer_step(outer, states[p], own[p], [sent[i]])
            except OuterMessageError:
                refused.add(p)
                raise
        except OuterMessageError:
            for peer, before in zip((i, p), saved, strict=True):
                _restore(states[peer], before)
                step_alone(outer, states[peer], own[peer])
    return refused


class RunEvidence:
    """What the honest guards would publish in the run state, and the exclusions the run draws from it."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.struck: dict[bytes, dict[bytes, dict]] = {}  # accused -> striker -> {"round", "strikes", "why"}
        self.excluded: dict[int, int] = {}  # replica -> the round the run excluded it

    def note(self, t: int, receiver: int, sender: int, verdict: Verdict) -> None:
        if verdict.strike:
            by = self.struck.setdefault(_key(sender), {})
            by[_key(receiver)] = note_strike(by.get(_key(receiver)), t, verdict.reason)

    def update(self, t: int, guards: Sequence[Guard | None]) -> None:
        evidence: dict[bytes, dict[bytes, dict]] = {}  # a local exclusion is what a live peer accuses
        for i, g in enumerate(guards):
            for origin, r in g.excluded.items() if g is not None else ():
                evidence.setdefault(_key(int(origin)), {})[_key(i)] = {"round": r, "why": "guard"}
        for key in run_exclusions(evidence, self.struck, {}, [t] * self.replicas):
            self.excluded.setdefault(int(key), t)

    def partners(self, t: int, seed: int) -> list[int | None]:
        names = [f"{i:08d}" for i in range(self.replicas) if i not in self.excluded]
        paired = pairing(names, t, seed)
        return [None if (q := paired.get(f"{i:08d}")) is None else int(q) for i in range(self.replicas)]


def _key(replica: int) -> bytes:
    return f"{replica:08d}".encode()


def _decode(
    outer: OuterConfig, state: OuterState, own: bytes, message: bytes, fast: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float]:
    """The partner's θ as this peer's step would apply it (wrapped blocks: own θ) and the wrapped fraction."""
    msg = unpack(message, outer.method)
    compressed_noloco.check_steps(msg, unpack(own, outer.method).steps)
    dec = compressed_noloco.read_lattice(msg, state.slow, outer)
    wrapped = sum(int(w.sum()) for w in dec.wrapped.values())
    total = sum(w.numel() for w in dec.wrapped.values())
    values = {k: torch.where(dec.wrapped[k], fast[k].float(), v) for k, v in dec.values.items()}
    return values, wrapped / max(1, total)


def judge_all(
    outer: OuterConfig,
    reps: Replicas,
    t: int,
    states: list[OuterState],
    guards: list[Guard | None],
    own: list[bytes],
    sent: list[bytes],
    fast: list[dict[str, torch.Tensor]],
    partners: list,
    probe: tuple[torch.Tensor, torch.Tensor],
) -> dict[int, Verdict]:
    """Every guarded receiver's verdict on its partner's message this round."""
    verdicts: dict[int, Verdict] = {}
    decoded: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
    for i, p in enumerate(partners):
        guard = guards[i]
        if p is None or guard is None:
            continue
        try:
            decoded[i] = _decode(outer, states[i], own[i], sent[p], fast[i])
        except OuterMessageError as exc:
            reason = "step" if "implausible" in str(exc) else "format"
            verdicts[i] = guard.refuse_malformed(t, states[p].origin, reason)
    if not decoded:
        return verdicts
    order = sorted(decoded)
    models = [decoded[i][0] for i in order] + [fast[i] for i in order] + [states[i].slow for i in order]
    px, py = (w[order].repeat(3, 1, 1) for w in probe)
    with torch.no_grad():
        losses = [float(v) for v in reps.losses(_stack(models), px, py)]
    n = len(order)
    for k, i in enumerate(order):
        guard = guards[i]
        assert guard is not None
        values, wrapped = decoded[i]
        p = partners[i]
        verdicts[i] = guard.judge(
            t,
            states[p].origin,
            unpack(sent[p], outer.method),
            states[i].slow,
            fast[i],
            values,
            wrapped,
            Probe(slow=losses[2 * n + k], own=losses[n + k], partner=losses[k]),
        )
    return verdicts


def run_byzantine(
    cfg: SimConfig,
    batches: Batches,
    init: dict,
    outer: OuterConfig,
    attack: str | None,
    guarded: bool,
    attacker: int = 0,
    guard_config: GuardConfig | None = None,
    deadline: float | None = None,
) -> dict:
    """One run; returns the final held-out losses, the honest peers' mean and every judged exchange."""
    if outer.method != "compressed-noloco":
        raise ValueError("the Byzantine benchmark drives the default method, compressed-noloco")
    start = time.monotonic()
    r = cfg.replicas
    outer = replace(outer, n_peers=r)
    reps = Replicas(cfg, init, r)
    states = [OuterState.fresh(f"{i:08d}", init) for i in range(r)]
    hostile = attacker if attack is not None else None
    guards: list[Guard | None] = [Guard(guard_config) if guarded and i != hostile else None for i in range(r)]
    memory = byzantine.Memory(seed=cfg.seed)
    run = RunEvidence(r) if guarded else None
    xs, ys = batches.x, batches.y
    if attack == "other_data":
        cipher = byzantine.byte_cipher(cfg.seed)
        xs, ys = xs.clone(), ys.clone()
        xs[:, attacker], ys[:, attacker] = byzantine.cipher_batch(xs[:, attacker], ys[:, attacker], cipher)
    t_len = cfg.model.block_size
    windows = [
        fixed_windows(s.data, t_len, PROBE_WINDOWS, seed=4321 + i) for i, s in enumerate(batches.samplers)
    ]
    probe = (torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows]))
    exchanges: list[dict] = []
    curve = []
    step = 0
    for t in range(cfg.outer_steps):
        for _ in range(cfg.inner_steps):
            reps.inner_step(lr_at(cfg, step, cfg.total_steps), xs[step], ys[step])
            step += 1
        fast = [reps.replica(i) for i in range(r)]
        own = [make_message(outer, states[i], fast[i]) for i in range(r)]
        sent = list(own)
        if run is not None:  # the run's exclusions leave the pairing, as live daemons leave them out
            partners = run.partners(t, cfg.seed)
        else:
            partners = [partner_index(r, i, t, cfg.seed) for i in range(r)]
        if hostile is not None and attack is not None:
            forged = byzantine.forge(attack, t, states[hostile].slow, fast[hostile], memory)
            if forged.raw is not None:
                sent[hostile] = forged.raw
            elif forged.fast is not None:
                sent[hostile] = make_message(outer, states[hostile], forged.fast)
            memory.remember(t, own[hostile], fast[hostile])
            p = partners[hostile]
            if attack == "copy" and p is not None:  # what it received this round, sent on next round
                try:
                    memory.received = _decode(outer, states[hostile], own[hostile], sent[p], fast[hostile])[0]
                except OuterMessageError:
                    memory.received = None
        if run is not None:
            verdicts = judge_all(outer, reps, t, states, guards, own, sent, fast, partners, probe)
            for i, p in enumerate(partners):
                if p is None:
                    step_alone(outer, states[i], own[i])
                    continue
                v = verdicts.get(i)
                weighted_step(outer, states[i], own[i], sent[p], 1.0 if v is None else v.weight)
                if v is not None:
                    exchanges.append(_record(t, i, p, hostile, v.action, v.reason, v.weight, v.scores))
                    exchanges[-1]["strike"] = v.strike
                    run.note(t, i, p, v)
            run.update(t, guards)
        else:
            refused = product_exchange(outer, states, own, sent, partners)
            for i, p in enumerate(partners):
                if p is not None and i != hostile:
                    bad = i in refused
                    exchanges.append(
                        _record(
                            t,
                            i,
                            p,
                            hostile,
                            REFUSE if bad else "accept",
                            "step" if bad else "ok",
                            float(not bad),
                            {},
                        )
                    )
        stacked = _stack([s.slow for s in states])
        reps.load(stacked)
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.outer_steps:
            if deadline is not None and time.time() > deadline:
                raise OutOfTime
            curve.append(
                {"round": t + 1, "honest_loss": _honest_mean(evaluate(reps, stacked, batches), hostile)}
            )
    losses = evaluate(reps, _stack([s.slow for s in states]), batches)
    excluded = [
        {"receiver": i, "origin": o, "round": rnd}
        for i, g in enumerate(guards)
        if g is not None
        for o, rnd in sorted(g.excluded.items())
    ]
    return {
        "attack": attack,
        "guarded": guarded,
        "attacker": hostile,
        "losses": losses,
        "honest_loss": _honest_mean(losses, hostile),
        "curve": curve,
        "exchanges": exchanges,
        "excluded": excluded,
        "run_excluded": {f"{i:08d}": t for i, t in sorted(run.excluded.items())} if run is not None else {},
        "seconds": time.monotonic() - start,
    }


def _honest_mean(losses: list[float], hostile: int | None) -> float:
    kept = [v for i, v in enumerate(losses) if i != hostile]
    return sum(kept) / len(kept)


def _record(t: int, i: int, p: int, hostile: int | None, action: str, reason: str, w: float, s: dict) -> dict:
    return {
        "round": t,
        "receiver": i,
        "sender": p,
        "hostile": p == hostile,
        "action": action,
        "reason": reason,
        "weight": w,
        "scores": {k: round(v, 5) for k, v in s.items()},
    }
