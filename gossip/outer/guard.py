"""A peer's judgement of its partner's message before it pulls toward it (issue 18, "Poisoned updates").

The format, shape, finiteness and lattice-step checks of the methods (`wire.unpack`, `compressed_noloco`'s
MAX_STEP_RATIO) stop malformed messages; this module stops well-formed harmful ones. With pairwise gossip a
peer must judge its partner alone, from what it holds: its slow weights φ, its own fast weights θ_i after H
inner steps, and the partner's decoded θ_p. Everything is measured on the partner's *implied update*
u_p = θ_p − φ against this peer's own u_i = θ_i − φ (see docs/outer-methods.md, "The partner guard"):

* header: the message must come from this round's partner and carry this round's number;
* repeats: a digest of the message's payload (codes and steps, not the header), kept for `replay_rounds`
  rounds, and a sketch (the decoded θ at a fixed seeded sample of coordinates): an exact or near-exact
  repeat is refused;
* gross norms and angles: ‖u_p‖ above ratio_refuse times the largest of this peer's own ‖u_i‖ of the last
  `window` rounds (a scaled update; not this round's alone, which the learning rate's decay shrinks toward
  zero at the end of a schedule while the replicas stay apart), ‖u_p‖/‖u_i‖ below ratio_floor (a free
  rider that sends φ back), or cos(u_p, u_i) below cos_refuse (a flipped update), is refused;
* lag: this peer remembers its own φ of the last `replay_rounds` rounds (at the sketch's coordinates); a θ_p
  that sits behind φ_{t−k} (k >= lag_min_rounds) by more than lag_refuse of the way φ moved since, an old θ
  re-encoded as this round's, is refused ("stale");
* a loss probe (optional: the caller evaluates θ_i and θ_p on a few held-out batches of its own shard, as
  Covenant's Gauntlet scores a submission by the loss it brings): the gap L(θ_p) − L(θ_i);
* robust history: the log norm ‖u_p‖, the cosine, the probe gap and the progress cosine cos(u_p, φ − φ_{t−k})
  (k up to progress_rounds: the way this peer's φ moved, which averages out the partners' shards better than
  u_i does) of recent partners (median and MAD of the last `window` not refused); the partner's one-sided
  z-scores against them are summed into a suspicion: beyond suspicion_clip the pull is down-weighted by
  (suspicion_clip / suspicion)², beyond suspicion_refuse refused;
* suspects: an origin this peer refused within `suspect_rounds` rounds is judged more strictly (clipped
  beyond suspect_clip, at most suspect_weight while the history is too short to judge; refused only by the
  same rules as anyone, so that a mistaken refusal cannot snowball into an exclusion) and its values are
  kept out of the history, so that an attacker caught once cannot hide in the honest spread afterwards;
* strikes: `strikes_to_exclude` refusals of one origin within `strike_rounds` rounds by the rules whose
  word holds alone (`strike_rules`) exclude it locally (every later message refused; the live worker
  publishes that as evidence); the live worker also publishes each strike, and the run adds up its
  members' strikes (gossip/runstate/evidence.py), since one guard meets a given partner only now and then;
* conduct: so does a record of bad messages, its last 3 all refused by any rule or clipped hard by the
  ordinary threshold (`conduct_*`): a robust rule's single word is no proof, since honest partners are now
  and then outliers, but an origin judged bad every time it is met is not one of them.

What the guard keeps per origin (strikes, suspects, conduct, exclusions) is bounded by `origin_cap`, the
oldest forgotten first; the rest by `window` and `replay_rounds`.

The fraction of the partner's lattice values that wrapped is reported, not judged: the method already
applies no pull in wrapped blocks.

A verdict's `weight` w is what the caller applies: 1 the full pull, 0 none (this peer steps alone, as when
sitting out), in between the partner's θ mixed toward this peer's own, θ_p' = θ_i + w·(θ_p − θ_i). For the
NoLoCo methods the step is affine in θ_p, so this is (1 − w)·step-alone + w·step-with-partner. Pure tensor
math and no I/O; deterministic for the same inputs; `state_dict` round-trips for checkpoints.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from shoal.gossip.outer.wire import Message

ACCEPT, CLIP, REFUSE = "accept", "clip", "refuse"
HISTORY_KEYS = ("log_norm", "cos", "probe", "progress")
MEASURE_CHUNK = 1 << 20  # values measured at a time (Guard.measure): 8 MiB of float64 scratch per update


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds, calibrated on the honest exchanges of `python -m bench.byzantine` (docs/benchmarks.md):
    with the simulator's non-IID shards an honest partner's implied update reached 6.4x this peer's own
    norm, a cosine of −0.48 and a probe loss 0.6 nats above this peer's θ, so the absolute rules only stop
    gross attacks and the rest is left to the robust history, which compares a partner with recent ones."""

    ratio_refuse: float = 16.0  # ‖u_p‖ over this many times this peer's recent ‖u_i‖: refuse (x100 scaled)
    ratio_floor: float = 0.5  # below: refuse (no training: the partner sent φ back while φs agree)
    cos_refuse: float = -0.7  # cos(u_p, u_i) below: refuse (a flipped pseudo-gradient, early in a run)
    # Stale: θ_p sits behind this peer's own φ of k rounds ago (k >= lag_min_rounds) by more than lag_refuse
    # of the distance this peer's φ moved since: -<θ_p - φ, φ - φ_{t-k}> / ‖φ - φ_{t-k}‖² (on the sketch's
    # coordinates). An honest θ is at or ahead of φ (its H inner steps point the way φ moved); the θ of 8
    # rounds ago re-encoded sits about a full 8 rounds back. Honest partners reached 0.35 in the calibration.
    lag_min_rounds: int = 6
    # Off by default (infinite): over 500 honest rounds (`python -m bench.byzantine_long`) the rule refused
    # 160 honest messages late in the run, 137 with the direction condition below, and the strikes excluded
    # every peer; 0.6 was the value calibrated on 40-round runs (the stale attack then cost 0.3 %).
    lag_refuse: float = math.inf
    # ... and only when θ_p points back along that path: cos(u_p, φ − φ_{t−k}) below −lag_cos_refuse. Late in
    # a long run φ moves little a round while the replicas stay apart, so an honest partner's offset, in a
    # direction of its own, projects far "behind" a short path: over 500 honest rounds the lag alone refused
    # 160 honest messages and excluded every peer (bench.byzantine_long).
    lag_cos_refuse: float = 0.5
    progress_rounds: int = 8  # the robust "progress" cosine: of u_p with φ - φ_{t-k}, k up to this
    window: int = 32  # past verdicts kept for the robust statistics
    min_history: int = 8  # judged partners before the robust rules apply
    # Suspicion: the sum of the one-sided robust z-scores (|x − median| / (1.4826·MAD)) of the log norm
    # ‖u_p‖, the cosine and the probe's loss gap. Honest partners reached 12 in the calibration run.
    suspicion_clip: float = 7.0  # beyond: the pull is down-weighted by (suspicion_clip / suspicion)²
    suspicion_refuse: float = 16.0  # beyond: refused
    # The progress cosine's z-score adds at most this much to the suspicion: evidence, never a refusal alone
    # (a peer's own path of φ can turn, and then every partner looks behind it for a few rounds).
    progress_z_cap: float = 4.0
    # A suspect origin (refused by this peer within suspect_rounds rounds) is judged more strictly: clipped
    # beyond suspect_clip (weight (suspect_clip / suspicion)²) and pulled with suspect_weight at most while
    # this peer has too little history to judge it; its values stay out of the robust history.
    suspect_rounds: int = 40
    suspect_clip: float = 3.0
    suspect_weight: float = 0.5
    origin_cap: int = 1024  # origins remembered (strikes, suspects, exclusions): the oldest are forgotten
    mad_floor: dict[str, float] = field(
        default_factory=lambda: {"log_norm": 0.05, "cos": 0.02, "probe": 0.01, "progress": 0.02}
    )  # the MAD never counts as smaller: a few near-identical partners must not make everything an outlier
    replay_rounds: int = 16  # rounds a payload digest and a sketch are remembered
    sketch_size: int = 2048  # coordinates of the decoded θ kept per judged message
    near_repeat: float = 0.02  # sketch distance to a remembered one / own update (on the sketch): a repeat
    # Refusals by these rules strike (and `refuse_malformed`'s): evidence that holds on its own. The robust
    # rules (outlier-*), the norm and the stale rule refuse without a strike: over 500 honest rounds they
    # refused honest partners now and then, and strikes from them cascaded into exclusions of honest peers.
    strike_rules: tuple[str, ...] = ("header", "replay", "repeat", "non-finite", "no-update", "direction")
    strikes_to_exclude: int = 3  # refusals (not clips) of one origin ...
    strike_rounds: int = 20  # ... within this many rounds exclude it locally
    # Conduct: what the robust rules say once is no proof, what they say every time is. An origin whose last
    # conduct_window judged messages (within conduct_rounds rounds) held conduct_bad that were bad is
    # excluded locally as if struck out. Bad: refused by any rule, or clipped to below conduct_weight of its
    # pull by the ordinary threshold, for another measure than the probe gap (see `_note_conduct`). Judged
    # as any origin would be, not by the stricter suspect threshold, so that one mistaken refusal cannot make
    # the next messages of an honest partner count against it.
    # Calibrated on bench.byzantine's guarded runs and 500 honest rounds (bench.byzantine_long): three bad in
    # a row excluded stale and other data within 10-14 rounds of their first refusal and no honest peer.
    conduct_window: int = 3
    conduct_bad: int = 3
    conduct_rounds: int = 40
    conduct_weight: float = 0.5
    seed: int = 0  # the sketch's coordinates


@dataclass(frozen=True)
class Probe:
    """Held-out loss of this peer's φ, its own θ_i and the partner's θ_p on the same batches of its shard."""

    slow: float
    own: float
    partner: float

    def score(self) -> float:
        """How much worse (nats) the partner's θ does on this peer's data than its own θ. Not compared with
        a fixed bar: with non-IID shards an honest partner's θ is often worse here than this peer's."""
        return self.partner - self.own


@dataclass(frozen=True)
class Verdict:
    action: str  # ACCEPT, CLIP or REFUSE
    weight: float  # 1, in (0, 1) or 0: how much of the partner's pull to apply (see the module docstring)
    reason: str  # the rule that decided ("ok" when accepted)
    scores: dict[str, float]  # ratio, cos, probe, wrapped, z: the evidence the live worker can publish
    strike: bool = False  # refused by a rule whose word holds alone: the live worker publishes each strike

    @property
    def flagged(self) -> bool:
        return self.action != ACCEPT


def payload_digest(message: Message) -> bytes:
    """A digest of what a message carries, not of its header: a replay restamped with a new round or origin
    still matches (its codes and steps are the same)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (*message.tensors, *message.checks):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(repr(message.steps).encode())
    if message.update is not None:
        h.update(message.update)
    return h.digest()


@dataclass(frozen=True)
class Measures:
    ratio: float  # ‖u_p‖ / ‖u_i‖
    norm: float  # ‖u_p‖
    own_norm: float  # ‖u_i‖
    cos: float  # cos(u_p, u_i)
    own_sketch: torch.Tensor  # u_i at the sketch's coordinates
    sketch: torch.Tensor  # θ_p at the sketch's coordinates
    slow_sketch: torch.Tensor  # φ at the sketch's coordinates


class Guard:
    """One peer's guard: its thresholds and what it remembers of past partners (one per peer)."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.history: dict[str, deque[float]] = {k: deque(maxlen=self.config.window) for k in HISTORY_KEYS}
        self.own_norms: deque[float] = deque(maxlen=self.config.window)  # own ‖u_i‖, every judged round
        self.digests: dict[bytes, int] = {}  # payload digest -> round seen
        self.sketches: deque[tuple[int, torch.Tensor]] = deque()  # (round, θ_p sketch)
        self.slow_sketches: deque[tuple[int, torch.Tensor]] = deque()  # (round, this peer's φ sketch)
        self.strikes: dict[str, list[int]] = {}  # origin -> rounds it was refused
        self.excluded: dict[str, int] = {}  # origin -> round it was excluded
        self.suspects: dict[str, int] = {}  # origin -> the last round this peer refused it
        self.conduct: dict[str, deque[tuple[int, bool]]] = {}  # origin -> (round, bad) of its last messages
        self.why: dict[str, str] = {}  # origin -> why it was excluded (the evidence a live peer publishes)
        self._index: dict[tuple[str, int], torch.Tensor] = {}

    # -- measures ------------------------------------------------------------------------------------------

    def _coords(self, name: str, numel: int, total: int, position: int) -> torch.Tensor:
        key = (name, numel)
        if key not in self._index:
            share = max(1, round(self.config.sketch_size * numel / max(1, total)))
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + position)
            self._index[key] = torch.randint(0, numel, (min(share, numel),), generator=g)
        return self._index[key]

    def measure(
        self,
        slow: Mapping[str, torch.Tensor],
        own: Mapping[str, torch.Tensor],
        partner: Mapping[str, torch.Tensor],
    ) -> Measures:
        """Norm ratio and cosine of the implied updates over all tensors (float64 sums), and the sketches.

        A chunk of MEASURE_CHUNK values at a time, in scratch reused throughout: whole-tensor temporaries
        interleaved with the sketches' small lasting tensors fragmented glibc's heap, and gpt2-small's worker
        peaked 2.3 models higher here than anywhere else in its round."""
        dot = own_sq = partner_sq = 0.0
        total = sum(t.numel() for t in slow.values())
        largest = min(MEASURE_CHUNK, max((t.numel() for t in slow.values()), default=1))
        u_i, u_p = torch.empty(largest, dtype=torch.float64), torch.empty(largest, dtype=torch.float64)
        step = torch.empty(largest, dtype=torch.float32)
        own_parts, parts, slow_parts = [], [], []
        for position, name in enumerate(sorted(slow)):
            phi = slow[name].detach().float().reshape(-1)
            theta_i = own[name].detach().float().reshape(-1)
            theta_p = partner[name].detach().float().reshape(-1)
            for start in range(0, phi.numel(), MEASURE_CHUNK):
                stop = min(phi.numel(), start + MEASURE_CHUNK)
                n = stop - start
                # θ − φ in float32 (as the updates are), then widened for the sums
                u_i[:n].copy_(torch.sub(theta_i[start:stop], phi[start:stop], out=step[:n]))
                u_p[:n].copy_(torch.sub(theta_p[start:stop], phi[start:stop], out=step[:n]))
                dot += float(torch.dot(u_p[:n], u_i[:n]))
                own_sq += float(torch.dot(u_i[:n], u_i[:n]))
                partner_sq += float(torch.dot(u_p[:n], u_p[:n]))
            idx = self._coords(name, phi.numel(), total, position)
            own_parts.append(theta_i[idx] - phi[idx])
            parts.append(theta_p[idx])
            slow_parts.append(phi[idx])
        own_norm, partner_norm = math.sqrt(own_sq), math.sqrt(partner_sq)
        ratio = partner_norm / own_norm if own_norm > 0 else (0.0 if partner_norm == 0 else math.inf)
        cos = dot / (own_norm * partner_norm) if own_norm > 0 and partner_norm > 0 else 0.0
        return Measures(
            ratio, partner_norm, own_norm, cos, torch.cat(own_parts), torch.cat(parts), torch.cat(slow_parts)
        )

    def progress(self, round_: int, m: Measures) -> tuple[float | None, float | None, float | None]:
        """Where θ_p sits along this peer's own recent path of φ, on the sketch's coordinates: the lag (the
        most negative projection of u_p on φ − φ_{t−k} over the remembered k >= lag_min_rounds, in units of
        that distance: −1 is a full k rounds back), the cosine of u_p with φ − φ_{t−k} at that k, and the
        cosine of u_p with φ − φ_{t−k} for the largest remembered k <= progress_rounds (None while nothing
        old enough is remembered)."""
        cfg = self.config
        phi = m.slow_sketch.double()
        u_p = m.sketch.double() - phi
        u_norm = float(u_p.norm())
        lag: float | None = None
        lag_cos: float | None = None
        cos: float | None = None
        for r, old in self.slow_sketches:
            k = round_ - r
            if k < cfg.lag_min_rounds:
                continue
            delta = phi - old.double()
            sq = float(delta.pow(2).sum())
            if sq <= 0.0:
                continue
            along = float(torch.dot(u_p, delta))
            if lag is None or along / sq < lag:
                lag = along / sq
                lag_cos = along / (math.sqrt(sq) * u_norm) if u_norm > 0 else 0.0
            if k <= cfg.progress_rounds and cos is None and u_norm > 0:
                cos = along / (math.sqrt(sq) * u_norm)  # the oldest such k: the deque is in round order
        return lag, lag_cos, cos

    # -- the verdict ---------------------------------------------------------------------------------------

    def judge(
        self,
        round_: int,
        expected_origin: str,
        message: Message,
        slow: Mapping[str, torch.Tensor],
        own_fast: Mapping[str, torch.Tensor],
        partner_fast: Mapping[str, torch.Tensor],
        wrapped: float = 0.0,
        probe: Probe | None = None,
    ) -> Verdict:
        """This round's verdict on `message` (already unpacked and decoded to `partner_fast` by the method,
        wrapped lattice blocks replaced by this peer's own values), and what the guard remembers of it."""
        self._forget(round_)
        m = self.measure(slow, own_fast, partner_fast)
        self.own_norms.append(m.own_norm)
        scores = {"ratio": m.ratio, "cos": m.cos, "wrapped": wrapped}
        if probe is not None:
            scores["probe"] = probe.score()
        lag, lag_cos, progress = self.progress(round_, m)
        if lag is not None:
            scores["lag"] = lag
        if lag_cos is not None:
            scores["lag_cos"] = lag_cos
        if progress is not None:
            scores["progress"] = progress
        digest = payload_digest(message)
        origin = message.origin if message.origin == expected_origin else expected_origin
        suspect = self._suspect(origin, round_)
        verdict = self._rules(round_, expected_origin, message, m, digest, scores, suspect)
        if verdict.reason not in ("header", "excluded"):  # another's message, or one no longer judged
            self._note_conduct(origin, round_, verdict)
        if verdict.action == REFUSE and verdict.reason in self.config.strike_rules:
            self._strike(origin, round_, verdict.reason)
            verdict = replace(verdict, strike=True)
        elif verdict.action == REFUSE:
            self._suspect_now(origin, round_)
        elif not suspect:
            values = {"log_norm": math.log(max(m.norm, 1e-30)), "cos": -m.cos}
            if "probe" in scores:
                values["probe"] = scores["probe"]
            if progress is not None:
                values["progress"] = -progress
            for key, value in values.items():
                self.history[key].append(value)
        # Remembered whatever the verdict: a refused message replayed later is still a replay.
        self.digests.setdefault(digest, round_)
        self.sketches.append((round_, m.sketch))
        if not self.slow_sketches or self.slow_sketches[-1][0] < round_:
            self.slow_sketches.append((round_, m.slow_sketch))
        return verdict

    def refuse_malformed(self, round_: int, expected_origin: str, reason: str) -> Verdict:
        """The verdict on a message the method itself refused (format, layout, lattice step): a strike."""
        self._forget(round_)
        self._strike(expected_origin, round_, reason)
        return Verdict(REFUSE, 0.0, reason, {}, strike=True)

    def _rules(
        self,
        round_: int,
        expected_origin: str,
        message: Message,
        m: Measures,
        digest: bytes,
        scores: dict[str, float],
        suspect: bool = False,
    ) -> Verdict:
        cfg = self.config

        def refuse(reason: str) -> Verdict:
            return Verdict(REFUSE, 0.0, reason, scores)

        if message.origin != expected_origin or message.round != round_:
            return refuse("header")  # another peer's message, or another round's
        if expected_origin in self.excluded:
            return refuse("excluded")
        if digest in self.digests:
            return refuse("replay")
        own_scale = float(m.own_sketch.norm())
        for _, old in self.sketches:
            if own_scale > 0 and float((m.sketch - old).norm()) <= cfg.near_repeat * own_scale:
                return refuse("repeat")
        if not all(math.isfinite(v) for v in scores.values()):
            return refuse("non-finite")
        # Late in a run this peer's own update shrinks with the learning rate while the replicas stay apart:
        # a partner's norm is gross only if it is far above both this peer's and recent partners'.
        past_norms = self.history["log_norm"]
        usual = math.exp(_median_mad(past_norms)[0]) if len(past_norms) >= cfg.min_history else 0.0
        own_recent = max(self.own_norms, default=0.0)
        if m.norm > cfg.ratio_refuse * max(own_recent, usual):
            return refuse("norm")
        if m.ratio < cfg.ratio_floor:
            return refuse("no-update")
        if m.cos < cfg.cos_refuse:
            return refuse("direction")
        if scores.get("lag", 0.0) < -cfg.lag_refuse and scores.get("lag_cos", 0.0) < -cfg.lag_cos_refuse:
            return refuse("stale")
        # Robust rules: how far this partner is from the recent ones, in MADs, one-sided (only a larger
        # update, a smaller cosine or a worse probe is suspicious), summed: attacks move several at once.
        # The norm against recent partners' norms, not as a ratio to this peer's own update: that ratio
        # jumps whenever the own update shrinks (the lr schedule) while the replicas stay apart.
        values = {
            "log_norm": math.log(max(m.norm, 1e-30)),
            "cos": -m.cos,
            "probe": scores.get("probe"),
            "progress": None if "progress" not in scores else -scores["progress"],
        }
        suspicion, worst, worst_key, judged = 0.0, 0.0, "", False
        for key, value in values.items():
            past = self.history[key]
            if value is None or len(past) < cfg.min_history:
                continue
            judged = True
            med, mad = _median_mad(past)
            z = (value - med) / (1.4826 * max(mad, cfg.mad_floor.get(key, 0.0)))
            scores[f"z_{key}"] = z
            suspicion += min(max(0.0, z), cfg.progress_z_cap) if key == "progress" else max(0.0, z)
            if z > worst:
                worst, worst_key = z, key
        scores["suspicion"] = suspicion
        # A suspect origin: the clip threshold is lowered to suspect_clip (the reason says "suspect" where
        # the ordinary threshold alone would have accepted it).
        clip = cfg.suspect_clip if suspect else cfg.suspicion_clip
        if suspicion > cfg.suspicion_refuse:
            return refuse(f"outlier-{worst_key}")
        if suspicion > clip:
            strict = suspicion <= cfg.suspicion_clip
            reason = f"{'suspect' if strict else 'outlier'}-{worst_key}"
            return Verdict(CLIP, (clip / suspicion) ** 2, reason, scores)
        if suspect and not judged:
            return Verdict(CLIP, cfg.suspect_weight, "suspect", scores)
        return Verdict(ACCEPT, 1.0, "ok", scores)

    def _suspect(self, origin: str, round_: int) -> bool:
        last = self.suspects.get(origin)
        return last is not None and last > round_ - self.config.suspect_rounds

    def _suspect_now(self, origin: str, round_: int) -> None:
        """A refusal without a strike still makes the origin a suspect (judged more strictly a while)."""
        self.suspects.pop(origin, None)
        self.suspects[origin] = round_
        while len(self.suspects) > self.config.origin_cap:
            del self.suspects[next(iter(self.suspects))]

    def _strike(self, origin: str, round_: int, reason: str) -> None:
        rounds = [r for r in self.strikes.pop(origin, []) if r > round_ - self.config.strike_rounds]
        rounds.append(round_)
        self.strikes[origin] = rounds  # re-inserted: the dicts are in the order origins were last refused
        self.suspects.pop(origin, None)
        self.suspects[origin] = round_
        if len(rounds) >= self.config.strikes_to_exclude:
            self._exclude(origin, round_, f"{len(rounds)} strikes by round {round_}, last {reason}")
        self._cap()

    def _note_conduct(self, origin: str, round_: int, verdict: Verdict) -> None:
        """Keeps the origin's last judged messages, bad or not, and excludes it when conduct_bad were bad."""
        cfg = self.config
        suspicion = verdict.scores.get("suspicion", 0.0)
        ordinary = (cfg.suspicion_clip / suspicion) ** 2 if suspicion > cfg.suspicion_clip else 1.0
        z = {k: v for k, v in verdict.scores.items() if k.startswith("z_")}
        # A clip for the probe gap above all does not count: an honest partner whose shard differs from this
        # peer's looks worse on this peer's data every time it is met (bench.byzantine's honest runs: 3 of 4
        # meetings of one pair clipped that hard). Poisoned data shows as refusals.
        by_probe = bool(z) and max(z, key=lambda k: z[k]) == "z_probe"
        bad = verdict.action == REFUSE or (ordinary < cfg.conduct_weight and not by_probe)
        record = self.conduct.pop(origin, None) or deque(maxlen=cfg.conduct_window)
        record.append((round_, bad))
        self.conduct[origin] = record  # re-inserted: the dict is in the order origins were last judged
        recent = [(r, b) for r, b in record if r > round_ - cfg.conduct_rounds]
        if bad and sum(b for _, b in recent) >= cfg.conduct_bad:
            why = f"{sum(b for _, b in recent)} of its last {len(recent)} messages bad, last {verdict.reason}"
            self._exclude(origin, round_, why)
        self._cap()

    def _exclude(self, origin: str, round_: int, why: str) -> None:
        if origin not in self.excluded:
            self.excluded[origin] = round_
            self.why[origin] = why

    def _cap(self) -> None:
        cap = self.config.origin_cap
        for table in (self.strikes, self.suspects, self.excluded, self.conduct):
            while len(table) > cap:
                del table[next(iter(table))]
        for origin in [o for o in self.why if o not in self.excluded]:
            del self.why[origin]

    def _forget(self, round_: int) -> None:
        horizon = round_ - self.config.replay_rounds
        self.digests = {d: r for d, r in self.digests.items() if r > horizon}
        while self.sketches and self.sketches[0][0] <= horizon:
            self.sketches.popleft()
        while self.slow_sketches and self.slow_sketches[0][0] <= horizon:
            self.slow_sketches.popleft()
        suspect_horizon = round_ - self.config.suspect_rounds
        self.suspects = {o: r for o, r in self.suspects.items() if r > suspect_horizon}

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "own_norms": list(self.own_norms),
            "digests": [[d, r] for d, r in self.digests.items()],
            "sketches": [[r, s.clone()] for r, s in self.sketches],
            "slow_sketches": [[r, s.clone()] for r, s in self.slow_sketches],
            "strikes": {o: list(r) for o, r in self.strikes.items()},
            "excluded": dict(self.excluded),
            "suspects": dict(self.suspects),
            "conduct": {o: [[r, b] for r, b in record] for o, record in self.conduct.items()},
            "why": dict(self.why),
        }

    @classmethod
    def from_state_dict(cls, saved: Mapping, config: GuardConfig | None = None) -> Guard:
        guard = cls(config)
        for key, values in saved["history"].items():
            if key in guard.history:
                guard.history[key].extend(float(v) for v in values)
        guard.own_norms.extend(float(v) for v in saved.get("own_norms", []))
        guard.digests = {bytes(d): int(r) for d, r in saved["digests"]}
        guard.sketches = deque((int(r), s.clone()) for r, s in saved["sketches"])
        guard.slow_sketches = deque((int(r), s.clone()) for r, s in saved.get("slow_sketches", []))
        guard.strikes = {str(o): [int(r) for r in rs] for o, rs in saved["strikes"].items()}
        guard.excluded = {str(o): int(r) for o, r in saved["excluded"].items()}
        guard.suspects = {str(o): int(r) for o, r in saved.get("suspects", {}).items()}
        window = guard.config.conduct_window
        guard.conduct = {
            str(o): deque(((int(r), bool(b)) for r, b in record), maxlen=window)
            for o, record in saved.get("conduct", {}).items()
        }
        guard.why = {str(o): str(w) for o, w in saved.get("why", {}).items() if o in guard.excluded}
        return guard


def _median_mad(values: deque[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    med = float(t.median())
    return med, float((t - med).abs().median())


def mix(
    own: Mapping[str, torch.Tensor], partner: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """θ_i + w·(θ_p − θ_i): the partner's θ as a verdict of weight w lets it pull (1: unchanged)."""
    return {n: own[n].float() + weight * (partner[n].float() - own[n].float()) for n in own}
