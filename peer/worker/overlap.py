"""Overlapped rounds: the next round trains while the daemon swaps this one (`peer join --overlap`, or on
its own while swaps are long for the model: `Policy`).

Without overlap the worker waits for the swap, takes its outer step and only then trains the next round, so
the link's time and the outer step's are training time lost. With overlap, once the round's message is made
the worker takes the outer step it could take alone (its own message, as a round without a partner does),
loads that φ' and trains on. When the swap's answer comes (between two inner steps, or at the end of the
next round at the latest) it takes the round's real outer step from the state it had saved, with the partner's
message and the guard as usual, and adds the difference between the two φ to the fast weights trained
meanwhile: the partner's part of the step lands one round late, and φ is exactly what it would have been
without overlap. `python -m bench.convergence --methods default:overlap=true` measures what the late
partner part costs in loss (docs/benchmarks.md).

What an overlapped round keeps until it settles: the outer state before its step (its tensors, not copies:
outer steps replace them), this round's fast weights for the guard, and where the inner loop stood (for a
checkpoint at the round's start and for a stop before the answer). The tensors, three models' worth, go to
a spill file beside the checkpoint (`spill`) while the next round trains, and come back memory-mapped for
the settling step (worker/spill.py): held in memory they were gpt2-small's worker's peak, 4 models above a
round without overlap. Without a spill file they stay in memory (the fast weights as a copy: training goes
on in the model).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shoal.gossip.outer.methods import outer_step
from shoal.peer.worker import spill as spill_file
from shoal.peer.worker.train import Trainer

log = logging.getLogger("shoal.peer.worker")


@dataclass
class Overlap:
    """One round whose swap is still under way while the next round trains."""

    own: bytes  # this round's message, as sent
    saved: tuple  # the outer state before the round's step (see `_outer_parts`); its tensors None if spilled
    fast: dict[str, torch.Tensor]  # this round's fast weights (CPU copies), for the guard; empty if spilled
    alone: list[torch.Tensor]  # φ' the next round started from (own message only)
    inner_step: int  # the inner-step count and the sampler's state at the round's end
    sampler_rng: torch.Tensor
    optimizer_file: str | None  # the round's inner-optimizer state on disk, for its checkpoint
    spill: Path | None = None  # where `saved`'s tensors and `fast` wait for the answer
    spans: list[spill_file.Span] = field(default_factory=list)  # where in `spill`


OVERLAP_MODES = ("auto", "on", "off")  # `peer join --overlap` / `--no-overlap` / neither
# "auto" overlaps while the last swap (our payload handed to the daemon until the partner's is in: the link,
# and the wait for a late partner) took at least this share of a round's training and AUTO_MIN_SWAP_S: time
# the worker would idle, which costs more than overlap's late partner part costs in loss (0.5-1.3 % per
# token in bench.convergence) and its own work costs in time (an outer step more, the spill file's write and
# read: gpt2-small 4-16 s a round on this project's VMs). Payloads under AUTO_MIN_BYTES never count: they
# cross any home link in well under a second, and a small model's round is short enough that a partner's
# ordinary lateness would make every round overlap.
AUTO_SWAP_SHARE = 0.25
AUTO_MIN_SWAP_S = 1.0
AUTO_MIN_BYTES = 2 << 20


class Policy:
    """Whether the next round overlaps: always ("on"), never ("off"), or, "auto", while the swap is long for
    the model (see AUTO_SWAP_SHARE). Says when "auto" starts or stops overlapping."""

    def __init__(self, mode: str) -> None:
        if mode not in OVERLAP_MODES:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {mode!r}")
        self.mode = mode
        self.train_seconds: float | None = None  # the last full round's inner steps
        self.swap_seconds: float | None = None  # the last swap's, as the daemon timed it
        self.active = mode == "on"

    def note_training(self, seconds: float, full_round: bool) -> None:
        if full_round:
            self.train_seconds = seconds

    def note_answer(self, reply: dict[str, Any]) -> None:
        """The daemon's answer to a round's payload: `swap_seconds` when it swapped."""
        value, nbytes = reply.get("swap_seconds"), reply.get("nbytes")
        if reply.get("type") == "partner" and isinstance(value, (int, float)) and value >= 0:
            big = isinstance(nbytes, int) and nbytes >= AUTO_MIN_BYTES
            self.swap_seconds = float(value) if big else 0.0

    def next_round(self) -> bool:
        if self.mode != "auto":
            return self.active
        swap, train = self.swap_seconds, self.train_seconds
        if swap is None or train is None:
            return self.active
        slow = swap >= max(AUTO_MIN_SWAP_S, AUTO_SWAP_SHARE * train)
        if slow and not self.active:
            log.info(
                "overlapping rounds: a swap takes %.1f s, %.0f %% of a round's training (--no-overlap "
                "turns this off)", swap, 100 * swap / max(train, 1e-9),
            )  # fmt: skip
        elif self.active and not slow:
            log.info("no longer overlapping rounds: a swap now takes %.1f s", swap)
        self.active = slow
        return self.active


SPILL_NAME = "overlap-spill.bin"  # in the worker's state folder, beside its checkpoint
SPILLED = ("slow", "momentum", "error")  # the outer state's tensor dicts, `_outer_parts`' first three


def _outer_parts(trainer: Trainer) -> tuple:
    o = trainer.outer
    return (o.slow, o.momentum, o.error, o.round, dict(o.drift), dict(o.counters))


def _restore(trainer: Trainer, saved: tuple) -> None:
    o = trainer.outer
    o.slow, o.momentum, o.error, o.round, o.drift, o.counters = saved


@torch.no_grad()
def begin(trainer: Trainer, own: bytes, optimizer_file: str | None, spill: Path | None = None) -> Overlap:
    """The round's step alone, φ' into the model, and what `settle` needs (in `spill` when given); the next
    round trains from here."""
    saved = _outer_parts(trainer)
    overlap = Overlap(
        own,
        saved,
        {},
        [],
        trainer.inner_step,
        trainer.sampler.generator.get_state(),
        optimizer_file,
        spill,
    )
    if spill is not None:
        # On disk first (the model still holds this round's fast weights: written as they are, no copy);
        # then nothing here holds the old state, and the step alone consumes it tensor by tensor.
        groups = {**dict(zip(SPILLED, saved, strict=False)), "fast": trainer.fast()}
        try:
            overlap.spans = spill_file.write(spill, groups)
        except OSError as error:  # a full disk, say: this round keeps them in memory, as without a file
            log.warning("could not write %s (%s): the overlapped round's state stays in memory", spill, error)
            _drop_spill(overlap)
        else:
            overlap.saved = (None,) * len(SPILLED) + saved[len(SPILLED) :]
            del saved, groups
            outer_step(trainer.outer_config, trainer.outer, own, [], consume=True)
    if overlap.spill is None:
        overlap.fast = {name: t.clone() for name, t in trainer.fast().items()}
        outer_step(trainer.outer_config, trainer.outer, own, [])
    overlap.alone = trainer.slow
    trainer.load_weights(overlap.alone)
    trainer.round_steps = 0
    return overlap


def _unspill(overlap: Overlap) -> tuple[tuple, dict[str, torch.Tensor]]:
    """The saved outer state and fast weights, mapped back from the spill file (which goes at once)."""
    if overlap.spill is None:
        return overlap.saved, overlap.fast
    spilled = spill_file.read(overlap.spill, overlap.spans)
    _drop_spill(overlap)
    parts = tuple(spilled.get(k, {}) for k in SPILLED)
    return parts + overlap.saved[len(SPILLED) :], spilled.get("fast", {})


def _drop_spill(overlap: Overlap) -> None:
    if overlap.spill is not None:
        with contextlib.suppress(FileNotFoundError):
            overlap.spill.unlink()  # a mapping of it stays valid until its tensors go
        overlap.spill = None


@torch.no_grad()
def settle(
    trainer: Trainer, overlap: Overlap, number: int, partner: bytes | None, partner_id: str | None
) -> str:
    """Round `number`'s real outer step (the daemon may have moved us to the run's round): the partner's
    message judged and pulled toward as without overlap, or alone when the swap failed; its difference from
    φ' goes into the fast weights. Returns the outcome."""
    schedule = number * trainer.settings.inner_steps  # the run's, when the daemon moved us to its round
    overlap.inner_step = max(overlap.inner_step, schedule)
    trainer.inner_step = max(trainer.inner_step, schedule + trainer.round_steps)
    if partner is None:  # a skipped round: the step taken alone was the round's step
        _drop_spill(overlap)
        trainer.verdict = None
        trainer.round = number
        return "alone"
    saved, fast = _unspill(overlap)
    overlap.saved, overlap.fast = (), {}  # the step consumes the old state: nothing else may hold it
    _restore(trainer, saved)
    del saved
    # The fast weights trained meanwhile minus φ' now, φ' let go, plus the new φ after the step: a model
    # less at the step's peak than adding (new φ − φ') at the end.
    for p, old in zip(trainer.model.parameters(), overlap.alone, strict=True):
        p.sub_(old.to(p.device, p.dtype))
    overlap.alone = []
    trainer.round = number - 1
    outcome = trainer.step_outer(overlap.own, partner, partner_id, fast)
    for p, new in zip(trainer.model.parameters(), trainer.slow, strict=True):
        p.add_(new.to(p.device, p.dtype))
    return outcome


def round_start_state(trainer: Trainer, overlap: Overlap) -> dict[str, Any]:
    """The settled round's checkpoint: as if the next round had not begun (its inner steps are not kept; a
    resumed peer trains that round again from the settled φ, drawing the same batches)."""
    steps, trainer.round_steps = trainer.round_steps, 0  # so that the model's weights are not copied in
    try:
        state = trainer.state_dict(overlap.optimizer_file)
    finally:
        trainer.round_steps = steps
    state.update(
        inner_step=overlap.inner_step,
        round_steps=0,
        fast=list(trainer.slow),
        sampler_rng=overlap.sampler_rng,
    )
    return state


@torch.no_grad()
def abandon(trainer: Trainer, overlap: Overlap) -> None:
    """A stop before the swap's answer: the round ends as one without a partner (what φ' is), and the next
    round's inner steps are dropped, so that a checkpoint now holds a whole round. The inner optimizer's
    moments in memory have moved on; the checkpoint takes the round's own (`optimizer_file`)."""
    _drop_spill(overlap)
    trainer.load_weights(overlap.alone)
    trainer.round_steps = 0
    trainer.inner_step = overlap.inner_step
    trainer.sampler.generator.set_state(overlap.sampler_rng)
