"""The worker's training state and its two loops: H inner AdamW steps, then one outer step.

Read top to bottom, as nanoGPT's train.py: build model and data, step the inner optimizer on local
batches (warmup + cosine driven by the global inner-step count), and at each round boundary turn our
fast weights into this round's message and combine it with the partner's to move the slow weights.

What the message is and how the two combine is the outer method's business (gossip/outer): the run's
default is chosen by bench/convergence. A partner message that fails validation never touches the
weights: the round then counts as one without a partner.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.errors import ShoalError
from shoal.gossip.outer import byzantine
from shoal.gossip.outer.errors import OuterError, OuterMessageError
from shoal.gossip.outer.guard import CLIP, REFUSE, Guard, Probe, Verdict
from shoal.gossip.outer.guarded_step import JUDGED, MAX_ROUND_LAG, partner_fast, weighted_step
from shoal.gossip.outer.methods import (
    DEFAULT_METHOD,
    METHODS,
    TOPOLOGY,
    OuterConfig,
    OuterState,
    make_message,
    outer_step,
    uses_error_feedback,
)
from shoal.peer.config import ConfigError
from shoal.peer.worker.checkpoints import CheckpointError, load_optimizer_file, write_checkpoint
from shoal.peer.worker.data import BatchSampler, fixed_windows, load_corpus, shard
from shoal.peer.worker.hf import HFCausalLM, tokenize_text
from shoal.peer.worker.memory import release_free_memory
from shoal.peer.worker.model import GPT, PRESETS, GPTConfig
from shoal.peer.worker.presets import peer_number

CHECKPOINT_FORMAT = 2  # 2: the outer method's whole state (phi, error feedback, momentum)
EVAL_SEED = 1234  # the same evaluation windows on every peer of every run on this corpus
# A round's evaluation unless `eval_windows` is set: 64 windows, or EVAL_TOKENS' worth of longer ones (16 of
# gpt2-small's 1,024 tokens: 64 of those took 250 s a round on a 2-core machine, longer than its training).
EVAL_WINDOWS, EVAL_TOKENS = 64, 16384
DEFAULT_SHARDS = 16
# Tokens whose activations an inner step holds at once: the batch goes through in micro-batches of this many
# tokens (whole windows, at least one), gradients summed. At `base`'s batch of 16 x 256 tokens the
# activations were 0.8 GB, 19 times the model; the step's matmuls stay large enough to run at full speed.
MICRO_BATCH_TOKENS = 1024
# Activation checkpointing (GPT.checkpoint_blocks) under "auto": on when one micro-batch's activations would
# exceed both one fp32 model and this floor. Measured on a CPU, one micro-batch of 1,024 tokens: gpt2-small's
# activations 1,066 -> 347 MB (2.1 models) for 1.24x the step's time; base's 290 -> 187 MB for 1.28x, a
# trade worth making only where the activations are a large part of the worker.
CHECKPOINT_FLOOR_BYTES = 512 * 1024 * 1024
# fp32 values one token's activations hold per layer and embedding channel (measured: 28 for gpt2-small,
# 31 for base), the estimate "auto" decides by.
ACTIVATION_VALUES = 30
CHECKPOINTING_MODES = ("auto", "on", "off")
EVAL_BATCH_TOKENS = 4096  # the same for an evaluation (no gradients: four times as many)
# The guard's loss probe: this many fixed windows of the peer's own shard, on which its own θ, its φ and the
# partner's θ are evaluated before it pulls toward the partner (three forward passes of a small batch).
PROBE_WINDOWS = 8
# Tokens per probe window at most: the probe runs three forward passes every round (φ, our θ, the
# partner's θ), and full 1024-token windows of gpt2-small took about 100 s a round on one CPU thread.
PROBE_TOKENS = 256
PROBE_SEED = 4321


def checkpointing_pays(config: GPTConfig, parameters: int) -> bool:
    """Whether "auto" turns activation checkpointing on: one micro-batch's activations (estimated) would
    exceed both the fp32 model and CHECKPOINT_FLOOR_BYTES."""
    tokens = max(MICRO_BATCH_TOKENS, config.block_size)  # a micro-batch holds one window at least
    activations = ACTIVATION_VALUES * 4 * config.n_layer * config.n_embd * tokens
    return activations > max(4 * parameters, CHECKPOINT_FLOOR_BYTES)


class Interrupted(ShoalError):
    """A stop request cut an inner step or an evaluation short; nothing of it was applied."""


@dataclass(frozen=True)
class TrainSettings:
    model: str
    inner_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    eval_windows: int | None  # None: EVAL_TOKENS' worth
    seed: int
    threads: int
    method: str
    data: str | None
    rounds: int | None
    shard: list[int] | None
    init_seed: int  # the model's initial weights: the same for every peer of a run
    data_seed: int  # this peer's batch order
    peer_id: str
    # Train the next round while the daemon swaps this one (peer/worker/overlap.py): the partner's part of
    # the outer step reaches the fast weights one round late. "on", "off", or "auto" (overlap.Policy).
    overlap: str = "auto"
    # "auto", "on" or "off" (CHECKPOINTING_MODES): recompute each block's activations during backward.
    activation_checkpointing: str = "auto"
    # Test-only: the hostile behaviour this worker plays (gossip/outer/byzantine.py ATTACKS), for the live
    # Byzantine benchmark; None for every real peer.
    behave: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        return cls(**values)


class Trainer:
    def __init__(self, settings: TrainSettings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        # The GPU when there is one: bf16 autocast for the inner steps, fp32 weights and outer state.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        corpus = load_corpus(settings.data)
        torch.manual_seed(settings.init_seed)
        self.model: GPT | HFCausalLM
        if settings.model.startswith("hf:"):
            self.model = HFCausalLM(settings.model[3:])
            if corpus.train.dtype == np.uint8:  # bytes of text, not token files: tokenize them
                corpus = replace(
                    corpus,
                    train=tokenize_text(settings.model[3:], corpus.train),
                    validation=tokenize_text(settings.model[3:], corpus.validation),
                )
        else:
            self.model = GPT(replace(PRESETS[settings.model], vocab_size=corpus.vocab_size))
        self.model.to(self.device)
        self.checkpointing = self._enable_checkpointing(settings.activation_checkpointing)
        block = self.model.config.block_size
        self.corpus_sha256 = corpus.sha256
        index, count = settings.shard or (peer_number(settings.peer_id, DEFAULT_SHARDS), DEFAULT_SHARDS)
        self.shard = (index, count)
        self.sampler = BatchSampler(
            shard(corpus.train, index, count, block + 2), block, settings.batch_size, settings.data_seed
        )
        probe_block = min(block, PROBE_TOKENS)
        self.probe_x, self.probe_y = fixed_windows(self.sampler.data, probe_block, PROBE_WINDOWS, PROBE_SEED)
        windows = settings.eval_windows or min(EVAL_WINDOWS, max(8, EVAL_TOKENS // block))
        self.eval_x, self.eval_y = fixed_windows(corpus.validation, block, windows, EVAL_SEED)

        params = dict(self.model.named_parameters())
        self.names = list(params)
        # Weight decay on matrices only (embeddings and linear weights), as nanoGPT does.
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.lr,
            betas=(0.9, 0.95),
        )
        method = DEFAULT_METHOD if settings.method == "default" else settings.method
        pairwise = [m for m in METHODS if TOPOLOGY[m] == "pair"]
        if method not in pairwise:  # the daemon swaps with one partner a round: no all-gather, no relaying
            raise ConfigError(f"outer method {method!r} cannot run here; choose one of {', '.join(pairwise)}")
        self.outer_config = OuterConfig.tuned(method)
        # phi and momentum (CPU); an error-feedback buffer only for a method that uses one
        self.error_feedback = uses_error_feedback(method)
        self.outer = OuterState.fresh(settings.peer_id, self.fast(), error_feedback=self.error_feedback)
        # The partner guard (gossip/outer/guard.py) judges each partner's message before this peer pulls
        # toward it; `verdict` is the last round's, for the daemon to report and publish.
        self.guard = Guard() if method in JUDGED else None
        self.verdict: Verdict | None = None
        # Seconds of this round's encode, guard and outer step (decode and apply), for the round's events.
        self.seconds: dict[str, float] = {"encode": 0.0, "guard": 0.0, "outer": 0.0}
        self.attack: byzantine.Memory | None = None
        self.cipher: torch.Tensor | None = None
        if settings.behave is not None:
            if settings.behave not in byzantine.ATTACKS or method not in JUDGED:
                raise ConfigError(f"--behave {settings.behave!r}: one of {', '.join(byzantine.ATTACKS)}")
            self.attack = byzantine.Memory(seed=settings.data_seed)
            if settings.behave == "other_data":
                self.cipher = byzantine.byte_cipher(settings.data_seed, corpus.vocab_size)
        self.inner_step = 0
        # Inner steps done in the round under way: a worker stopped in the middle of a round saves them,
        # and the resumed one takes only the rest of that round's H before its outer step.
        self.round_steps = 0
        # Polled as the model runs, forward and backward, so that a stop does not wait out an inner step
        # (seconds for `base` on a CPU) or an evaluation: it raises Interrupted. None: never stop.
        self.should_stop: Callable[[], bool] | None = None
        for module in self.model.modules():
            if next(module.children(), None) is None:  # the leaves: the finest points to stop at
                module.register_forward_hook(self._poll_forward)

    def _enable_checkpointing(self, mode: str) -> bool:
        """Turns activation checkpointing on where `mode` asks for it; True when it is on."""
        if mode not in CHECKPOINTING_MODES:
            raise ConfigError(f"activation checkpointing must be one of {', '.join(CHECKPOINTING_MODES)}")
        if isinstance(self.model, HFCausalLM):
            if mode != "on":  # their activations are not estimated here: only on request
                return False
            if not getattr(self.model.inner, "supports_gradient_checkpointing", False):
                raise ConfigError("this Hugging Face model does not support activation checkpointing")
            self.model.inner.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            return True
        pays = checkpointing_pays(self.model.config, self.parameter_count())
        on = mode == "on" or (mode == "auto" and pays)
        self.model.checkpoint_blocks = on
        return on

    def _poll_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._poll()
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._poll_backward)  # called as backward reaches this module

    def _poll_backward(self, grad: torch.Tensor) -> None:
        self._poll()

    def _poll(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("stopped in the middle of an inner step or an evaluation")

    @property
    def round(self) -> int:
        return self.outer.round

    @round.setter
    def round(self, value: int) -> None:
        self.outer.round = value

    @property
    def slow(self) -> list[torch.Tensor]:
        return [self.outer.slow[name] for name in self.names]

    # --- shapes, for the daemon's checks --------------------------------------------------------------
    def spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in self.model.named_parameters()]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fast(self) -> dict[str, torch.Tensor]:
        """The fast weights on the CPU, where the outer state lives (messages are built from host memory)."""
        return {name: p.detach().to("cpu", torch.float32) for name, p in self.model.named_parameters()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- inner loop -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0.1x over the run, by the global inner-step count."""
        s = self.settings
        total = s.rounds * s.inner_steps if s.rounds else s.total_steps
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> float:
        """One inner step; a stop request during it raises Interrupted, and then the step never happened."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.inner_step)
        rng = self.sampler.generator.get_state()
        x, y = self.sampler.next()
        if self.cipher is not None:  # --behave other_data: the same windows of another "corpus"
            x, y = byzantine.cipher_batch(x, y, self.cipher)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # A micro-batch at a time, gradients summed: the activations of MICRO_BATCH_TOKENS at most.
            micro = max(1, MICRO_BATCH_TOKENS // x.shape[1])
            for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
                with self._autocast():
                    _, part = self.model(xs.to(self.device), ys.to(self.device))
                share = len(xs) / len(x)  # the batch's mean loss, as one pass would take it
                (part * share).backward()
                loss += part.item() * share
        except Interrupted:
            self.optimizer.zero_grad(set_to_none=True)
            self.sampler.generator.set_state(rng)  # a resumed worker draws this batch again
            raise
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        # Gradients freed now, not at the next step: the outer step, checkpoint and evaluation that may
        # come first would hold a model of dead gradients.
        self.optimizer.zero_grad(set_to_none=True)
        release_free_memory()  # the activations' and gradients' pages: the next phase allocates other sizes
        self.inner_step += 1
        self.round_steps += 1
        return loss

    @torch.no_grad()
    def evaluate(self, weights: list[torch.Tensor] | None = None) -> float:
        """Mean loss (nats per byte) on the run's fixed validation windows, of `weights` or of phi. Run
        with those weights in place of the model's (`torch.func.functional_call`): the fast weights are
        neither copied aside nor touched."""
        self.model.eval()
        chosen = weights if weights is not None else self.slow
        on_device = {n: t.to(self.device) for n, t in zip(self.names, chosen, strict=True)}

        def loss(x: torch.Tensor, y: torch.Tensor) -> float:
            batch = (x.to(self.device), y.to(self.device))
            return float(torch.func.functional_call(self.model, on_device, batch)[1])

        with self._autocast():
            # EVAL_BATCH_TOKENS at a time (16 of base's windows, 4 of gpt2-small's): 16 of gpt2-small's at
            # once held 1.5 models of activations.
            step = max(1, EVAL_BATCH_TOKENS // self.eval_x.shape[1])
            parts = zip(self.eval_x.split(step), self.eval_y.split(step), strict=True)
            losses = [(loss(x, y), len(x)) for x, y in parts]
        release_free_memory()
        return float(sum(value * n for value, n in losses) / sum(n for _, n in losses))

    # --- the run's weights, for joiners --------------------------------------------------------------
    def slow_chunks(self) -> Iterator[memoryview]:
        """phi as little-endian fp32, tensors in model order (what a joining peer starts from), a tensor
        at a time and without copies."""
        for name in self.names:
            tensor = self.outer.slow[name].detach().reshape(-1).float().contiguous()
            yield memoryview(tensor.numpy().data).cast("B")

    @torch.no_grad()
    def adopt(self, values: bytes, round_: int) -> None:
        """Takes a member's slow weights at `round_`; outer buffers empty (docs/outer-methods.md, P12-P13)."""
        flat = torch.from_numpy(np.frombuffer(values, dtype="<f4").copy())
        if flat.numel() != self.parameter_count() or not torch.isfinite(flat).all():
            raise CheckpointError("a member's weights do not fit this model or are not finite")
        fresh = dict(zip(self.names, flat.split([p.numel() for p in self.model.parameters()]), strict=True))
        shaped = {name: fresh[name].view_as(param) for name, param in self.model.named_parameters()}
        self.outer = OuterState.fresh(self.settings.peer_id, shaped, round_, self.error_feedback)
        self.load_weights(self.slow)
        self.inner_step = max(self.inner_step, round_ * self.settings.inner_steps)
        # A resumed peer that fell behind drops its own round under way (its fast weights are replaced);
        # it keeps AdamW's moments: per-parameter gradient scales that change slowly over a few rounds,
        # better than restarting them at zero as a brand-new peer must.
        self.round_steps = 0

    # --- outer step -------------------------------------------------------------------------------
    def message(self) -> bytes:
        """This round's message for the partner (sparse methods also fold it into error feedback)."""
        began = time.monotonic()
        with torch.no_grad():
            message = make_message(self.outer_config, self.outer, self.fast())
        self.seconds["encode"] = time.monotonic() - began
        return message

    @torch.no_grad()
    def outgoing(self, own: bytes) -> bytes:
        """What this peer sends its partner: its own message, or with --behave (tests only) the attack's."""
        if self.attack is None or self.settings.behave is None:
            return own
        fast = self.fast()
        forged = byzantine.forge(self.settings.behave, self.round, self.outer.slow, fast, self.attack)
        self.attack.remember(self.round, own, fast)
        if forged.raw is not None:
            return forged.raw
        assert forged.fast is not None
        return make_message(self.outer_config, self.outer, forged.fast)

    @torch.no_grad()
    def outer_step(self, own: bytes, partner: bytes | None, partner_id: str | None = None) -> str:
        """Moves the slow weights with our message and the partner's; returns what happened.

        The partner's message is validated in full, then judged by the guard (when `partner_id` names the
        partner), before anything changes: refused, the round proceeds as one without a partner and the
        reason is returned; clipped, its pull is down-weighted. `self.verdict` keeps the guard's verdict."""
        outcome = self.step_outer(own, partner, partner_id, self.fast())
        self.load_weights(self.slow)
        self.round_steps = 0
        return outcome

    @torch.no_grad()
    def step_outer(
        self, own: bytes, partner: bytes | None, partner_id: str | None, fast: dict[str, torch.Tensor]
    ) -> str:
        """`outer_step` without loading the new φ into the model: `fast` are this round's fast weights (the
        guard compares the partner's with them), which an overlapped round keeps aside (worker/overlap.py).
        `fast` is emptied once the guard is done with it: the step needs only the messages, and an
        overlapped round's copy of the model then goes before the step allocates the new φ and momentum."""
        outcome = "swapped" if partner is not None else "alone"
        self.verdict, weight = None, 1.0
        began = time.monotonic()
        self.seconds["guard"] = 0.0
        if partner is not None and self.guard is not None and partner_id is not None:
            self.verdict = self._judge(own, partner, partner_id, fast)
            fast.clear()
            release_free_memory()  # the partner's decoded θ, before the step allocates the new φ and momentum
            self.seconds["guard"] = time.monotonic() - began
            weight = self.verdict.weight
            if self.verdict.action == REFUSE:
                outcome = f"partner message refused by the guard: {self.verdict.reason}"
            elif self.verdict.action == CLIP:
                outcome = f"swapped, the partner's pull clipped to {weight:.2f} ({self.verdict.reason})"
        # consume: nothing here keeps the old φ's and momentum's dicts (a checkpoint holds its own dicts;
        # an overlapped round restored them from what it saved for this step alone), so each tensor of
        # the old state goes as soon as its step is done: a model less at the outer step's peak.
        try:
            if partner is None or weight <= 0.0:
                outer_step(self.outer_config, self.outer, own, [], consume=True)
            else:
                weighted_step(self.outer_config, self.outer, own, partner, weight, consume=True)
        except OuterError as error:
            outcome = f"partner message refused by the worker: {error}"
            outer_step(self.outer_config, self.outer, own, [], consume=True)
        release_free_memory()  # the guard's decode and the old φ and momentum
        # The decode of the partner's message and the step: the outer step's own cost, the guard's apart.
        self.seconds["outer"] = time.monotonic() - began - self.seconds["guard"]
        return outcome

    def _judge(self, own: bytes, partner: bytes, partner_id: str, fast: dict[str, torch.Tensor]) -> Verdict:
        """The guard's verdict on the partner's message (self.round: the rounds finished before this one)."""
        assert self.guard is not None
        try:
            message, theta_p, wrapped = partner_fast(self.outer_config, self.outer, own, partner, fast)
        except OuterMessageError as error:
            return self.guard.refuse_malformed(self.round, partner_id, str(error)[:200])
        if self.attack is not None and self.settings.behave == "copy":
            self.attack.received = theta_p  # what it will send back as its own next round
        # A partner that jumped to the run's round after making its message stamped the round it had
        # finished: judged as this round's. Out of range is another round's message: refused, no strike.
        if not self.round - MAX_ROUND_LAG <= message.round <= self.round:
            return Verdict(REFUSE, 0.0, f"round {message.round}, not this round's ({self.round})", {})
        probe = self._probe(fast, theta_p)
        this_round = replace(message, round=self.round)  # the digest ignores the header
        return self.guard.judge(
            self.round, partner_id, this_round, self.outer.slow, fast, theta_p, wrapped, probe
        )

    @torch.no_grad()
    def _probe(self, own: dict[str, torch.Tensor], partner: dict[str, torch.Tensor]) -> Probe:
        """Loss of φ, of our θ and of the partner's θ on PROBE_WINDOWS fixed windows of our own shard (a
        cheap Gauntlet). Short and not interruptible: a stop waits for it, as for the outer step."""
        self.model.eval()
        polling, self.should_stop = self.should_stop, None
        try:
            x, y = self.probe_x.to(self.device), self.probe_y.to(self.device)

            def loss(weights: dict[str, torch.Tensor]) -> float:
                with self._autocast():
                    on_device = {n: t.to(self.device) for n, t in weights.items()}
                    return float(torch.func.functional_call(self.model, on_device, (x, y))[1])

            return Probe(slow=loss(self.outer.slow), own=loss(own), partner=loss(partner))
        finally:
            self.should_stop = polling

    @torch.no_grad()
    def load_weights(self, weights: list[torch.Tensor]) -> None:
        """The model's weights ← `weights` (model order), copied in place."""
        for p, w in zip(self.model.parameters(), weights, strict=True):
            p.copy_(w)

    # --- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self, optimizer_file: str | None = None) -> dict[str, Any]:
        """Everything a resumed peer needs to go on exactly where it stopped (docs/outer-methods.md, P20),
        as CPU copies that training does not touch: a background thread may write them meanwhile.
        `optimizer_file`: the inner optimizer's state is in that file (CheckpointWriter.write_optimizer,
        written while nothing changed it), not copied in here."""
        return {
            "format": CHECKPOINT_FORMAT,
            "round": self.round,  # rounds finished: the outer state's, also when stopped in mid-round
            "inner_step": self.inner_step,
            "round_steps": self.round_steps,  # inner steps done of round `round` + 1
            "names": self.names,
            "model": self.settings.model,
            "corpus_sha256": self.corpus_sha256,
            "shard": list(self.shard),
            "outer": self.outer.state_dict(clone=False),  # the outer steps replace these, never write them
            # At a round's start the fast weights are φ itself (the outer step loaded it): the checkpoint
            # holds φ's tensors, which no step writes into, instead of a copy of the model.
            "fast": list(self.slow)
            if self.round_steps == 0
            else [p.detach().to("cpu", copy=True) for p in self.model.parameters()],
            # Its tensors change in place at every inner step: a copy, unless a file of its own holds them.
            "optimizer": None if optimizer_file else _cpu_copy(self.optimizer.state_dict()),
            "optimizer_file": optimizer_file,
            "sampler_rng": self.sampler.generator.get_state(),
            "guard": self.guard.state_dict() if self.guard is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {state.get('format')!r}, this worker reads {CHECKPOINT_FORMAT}"
            )
        if state["names"] != self.names or state["model"] != self.settings.model:
            raise CheckpointError(
                f"the checkpoint holds model {state['model']!r}, not {self.settings.model!r}"
            )
        try:
            self.outer = OuterState.from_state_dict(state["outer"])
        except OuterError as error:
            raise CheckpointError(str(error)) from error
        with torch.no_grad():
            self.load_weights(state["fast"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.generator.set_state(state["sampler_rng"])
        if self.guard is not None:  # absent from checkpoints written before the guard: a fresh one
            saved = state.get("guard")
            self.guard = Guard.from_state_dict(saved) if saved else Guard()
        self.inner_step = int(state["inner_step"])
        # Absent from checkpoints written before mid-round stops were kept: those began a round afresh.
        self.round_steps = min(max(0, int(state.get("round_steps", 0))), self.settings.inner_steps)

    def save(self, path: Path) -> None:
        """Writes the checkpoint atomically (the previous one becomes `.prev`), now: see CheckpointWriter."""
        write_checkpoint(path, self.state_dict())

    def load(self, path: Path) -> None:
        """Resumes from `path`; raises CheckpointError (one line: which file, what is wrong) and leaves the
        trainer as it was when the file is damaged, unreadable or of another model."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except PermissionError as error:
            raise CheckpointError(f"cannot read the checkpoint {path}: {error.strerror}") from error
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
            if isinstance(error, EOFError) and path.stat().st_size == 0:
                reason = "an empty file"
            raise CheckpointError(f"the checkpoint {path} is damaged ({reason[:160]})") from error
        if not isinstance(state, dict):
            raise CheckpointError(f"the checkpoint {path} is damaged (not a checkpoint)")
        if state.get("optimizer_file") is not None:
            state["optimizer"] = load_optimizer_file(path, state["optimizer_file"])
        before = self.state_dict()  # a load that fails half-way must not leave half of it behind
        try:
            self.load_state_dict(state)
        except CheckpointError as error:
            self.load_state_dict(before)
            raise CheckpointError(f"{error} (checkpoint {path})") from error
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            self.load_state_dict(before)
            raise CheckpointError(
                f"the checkpoint {path} is damaged ({type(error).__name__}: {str(error)[:160]})"
            ) from error


def _cpu_copy(value: Any) -> Any:
    """`value` (an optimizer's state dict) with every tensor copied to the CPU, containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(item) for item in value)
    return value
